"""A short video through `facefuse reconstruct` and the local mesh (open pack): frames streamed as images,
the face tracked across them, one identity for the track, overlay.mp4 and video.json written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facefuse.client.cli import main
from facefuse.io.video import video_info, write_video
from facefuse.servers.local import LocalMesh

pytestmark = pytest.mark.slow


def test_reconstruct_a_video_tracks_the_face_and_writes_the_overlay_video(open_mesh: LocalMesh,
                                                                         tmp_path: Path) -> None:
    import skimage.data

    photo = skimage.data.astronaut()
    frames = [np.ascontiguousarray(np.roll(photo, shift=3 * i, axis=1)) for i in range(3)]  # a slight pan
    video = write_video(tmp_path / "pan.mp4", frames, fps=10.0)
    out = tmp_path / "out"
    code = main(["reconstruct", str(video), "-o", str(out), "--gateway", open_mesh.gateway_address, "--every", "1",
                 "--no-progress", "--no-preview"])
    assert code == 0
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    ok = [e for e in lines if e["status"] == "OK"]
    assert len(ok) == 3 and {e["image_id"].rsplit("#", 1)[1] for e in ok} == {"000000", "000001", "000002"}
    for entry in ok:  # --no-preview: no previews, the rest as usual
        names = {f.rsplit("/", 1)[1] for f in entry["files"]}
        assert "mesh.glb" in names and "overlay.png" in names and "preview.png" not in names
    summaries = list(out.glob("*/video.json"))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    track, = summary["tracks"]
    assert track["frames"] == [0, 1, 2] and track["identity_images"] == 3
    assert track["posed_frames"] == 3 and set(track["jitter"]) == {"rotation_deg", "rotation_deg_raw",
                                                                   "translation_mm", "translation_mm_raw"}
    poses = np.load(out / track["dir"] / "poses.npz")
    assert poses["global_pose"].shape == (3, 3) and np.isfinite(poses["translation"]).all()
    assert (out / track["dir"] / "mesh.obj").is_file()
    info = video_info(out / summary["overlay"])
    assert (info.frames, info.width, info.height) == (3, photo.shape[1], photo.shape[0])
    from facefuse.io.video import FrameReader

    drawn = FrameReader(out / summary["overlay"]).frame(1).astype(float)
    x1, y1, x2, y2 = (round(v) for v in ok[1]["box"])
    inner = (slice(y1 + (y2 - y1) // 4, y2 - (y2 - y1) // 4), slice(x1 + (x2 - x1) // 4, x2 - (x2 - x1) // 4))
    on_face = np.abs(drawn[inner] - frames[1][inner]).mean()
    elsewhere = np.abs(drawn[:40, :40] - frames[1][:40, :40]).mean()  # compression error only
    assert on_face > 3 * elsewhere, (on_face, elsewhere)  # the grey mesh is drawn over the face
    # a rerun resumes: nothing is sent again, the video step runs again from the files
    assert main(["reconstruct", str(video), "-o", str(out), "--gateway", open_mesh.gateway_address, "--every", "1",
                 "--no-progress", "--no-preview"]) == 0
    assert json.loads(summaries[0].read_text())["tracks"][0]["frames"] == [0, 1, 2]


def test_reconstruct_writes_previews_through_the_pool(open_mesh: LocalMesh, tmp_path: Path) -> None:
    import imageio.v3 as iio
    import skimage.data
    from PIL import Image

    from facefuse.render import RULER_HEIGHT

    iio.imwrite(tmp_path / "a.png", skimage.data.astronaut())
    out = tmp_path / "out"
    assert main(["reconstruct", str(tmp_path / "a.png"), "-o", str(out), "--gateway", open_mesh.gateway_address,
                 "--no-progress"]) == 0
    entry, = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for name in ("preview.png", "uncertainty.png", "overlay.png"):
        relative = f"{entry['dir']}/{name}"
        assert relative in entry["files"] and (out / relative).is_file()
    preview = np.asarray(Image.open(out / entry["dir"] / "preview.png"))
    assert preview.shape == (384 + RULER_HEIGHT, 768, 3)  # two 384² views at the fixed scale, the ruler below
