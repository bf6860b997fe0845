"""`facefuse detect` through the local mesh: files written, resumable, bad inputs reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from facefuse.client.cli import main
from facefuse.servers.local import LocalMesh

pytestmark = pytest.mark.slow


@pytest.fixture
def photos(tmp_path: Path, astronaut_jpeg: bytes, group_photo: bytes) -> Path:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "astronaut.jpg").write_bytes(astronaut_jpeg)
    (folder / "sub" / "t1.jpg").write_bytes(group_photo)
    (folder / "broken.jpg").write_bytes(astronaut_jpeg[:2000])
    return folder


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_detect_writes_every_face_and_resumes(open_mesh: LocalMesh, photos: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["detect", str(photos), "-o", str(out), "--gateway", open_mesh.gateway_address, "--no-progress"]
    assert main(args) == 1  # the broken file fails, the others succeed
    lines = _results(out)
    ok = [e for e in lines if e["status"] == "OK"]
    assert len(ok) == 7  # 1 astronaut + 6 in t1
    broken = [e for e in lines if e["image_id"].endswith("broken.jpg")]
    assert len(broken) == 1 and broken[0]["status"] == "INVALID_ARGUMENT" and "truncated" in broken[0]["message"]
    for entry in ok:
        face_dir = out / entry["dir"]
        for name in ("crop112.png", "crop224.png", "kps5.npy", "landmarks.npy", "overlay.png"):
            assert (face_dir / name).is_file(), name
        assert np.load(face_dir / "landmarks.npy").shape == (468, 3)
    assert not list(out.rglob("*.tmp")), "no half-written files"

    # A rerun skips finished images; only the broken one is retried.
    capsys.readouterr()
    assert main(args) == 1
    assert "1 image(s) processed, 2 already done" in capsys.readouterr().out

    # An interrupted run: one face's file lost -> only that image is redone, its outputs restored.
    victim = next(e for e in ok if e["image_id"].endswith("astronaut.jpg"))
    (out / victim["dir"] / "overlay.png").unlink()
    capsys.readouterr()
    assert main(args) == 1
    assert "2 image(s) processed, 1 already done" in capsys.readouterr().out
    assert (out / victim["dir"] / "overlay.png").is_file()
    assert len(_results(out)) == 8  # compacted: one line per face or failed image


def test_cli_errors_are_one_line_not_tracebacks(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def detect(image: Path) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "facefuse.client.cli", "detect", str(image), "-o", str(tmp_path / "o"),
                   "--gateway", "127.0.0.1:1"]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)

    missing = detect(tmp_path / "nope.jpg")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "no such file" in missing.stderr
    (tmp_path / "a.jpg").write_bytes(b"x")
    down = detect(tmp_path / "a.jpg")  # gateway down
    assert down.returncode == 3 and "Traceback" not in down.stderr and "no gateway answers" in down.stderr


def test_identity_group_fuses_each_persons_images(open_mesh: LocalMesh, tmp_path: Path, astronaut_jpeg: bytes) -> None:
    import skimage.data
    from PIL import Image

    from facefuse.client.demo import occlude_mouth

    people = tmp_path / "people"
    (people / "eileen").mkdir(parents=True)
    (people / "eileen" / "clear.jpg").write_bytes(astronaut_jpeg)
    image = skimage.data.astronaut()
    # the mouth hidden: this image shows less of the face and must count less
    from facefuse.assets.store import ModelStore
    from facefuse.face.frontend import FaceFrontEnd

    (det,) = FaceFrontEnd.from_assets(None, ModelStore()).detect(image)
    Image.fromarray(occlude_mouth(image, det.kps5)).save(people / "eileen" / "masked.jpg", quality=92)
    out = tmp_path / "out"
    code = main(["reconstruct", str(people), "-o", str(out), "--gateway", open_mesh.gateway_address, "--no-progress",
                 "--identity-group", "folders", "--samples", "4"])
    assert code == 0
    (entry,) = [json.loads(line) for line in (out / "identities.jsonl").read_text().splitlines()]
    assert entry["identity"] == "eileen" and entry["used"] == 2
    weights = {m["image_id"].split("/")[-1]: m["weight"] for m in entry["members"]}
    assert weights["clear.jpg"] > weights["masked.jpg"]
    group = out / entry["dir"]
    vertices = [np.load(out / e["dir"] / "shape.npy") for e in _results(out) if e["status"] == "OK"]
    assert np.load(group / "shape.npy").shape == vertices[0].shape
    for name in ("mesh.obj", "mesh.ply", "mesh_uncertainty.ply", "uncertainty.npy", "identity.json"):
        assert (group / name).is_file()


def test_a_user_mask_marks_the_covered_regions_hidden(
    open_mesh: LocalMesh, tmp_path: Path, astronaut_jpeg: bytes
) -> None:
    import skimage.data
    from PIL import Image

    from facefuse.assets.store import ModelStore
    from facefuse.face.frontend import FaceFrontEnd

    image = skimage.data.astronaut()
    (det,) = FaceFrontEnd.from_assets(None, ModelStore()).detect(image)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "face.jpg").write_bytes(astronaut_jpeg)
    mask = np.zeros(image.shape[:2], np.uint8)
    mouth = det.kps5[3:5].mean(axis=0).astype(int)
    mask[mouth[1] - 15: mouth[1] + 15, mouth[0] - 30: mouth[0] + 30] = 255  # the photo itself is untouched
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "face.png")
    out = tmp_path / "out"
    assert main(["reconstruct", str(tmp_path / "in"), "-o", str(out), "--gateway", open_mesh.gateway_address,
                 "--masks", str(tmp_path / "masks"), "--no-visibility", "photometric", "--no-visibility", "hands",
                 "--no-visibility", "pose",
                 "--no-progress", "--samples", "4"]) == 0
    (entry,) = _results(out)
    visibility = json.loads((out / entry["dir"] / "visibility.json").read_text())
    assert visibility["sources"] == ["mask"]
    assert visibility["regions"]["lips"] < 0.5 and visibility["regions"]["forehead"] > 0.5
    assert visibility["regions"]["left_eye"] > 0.5 and visibility["regions"]["right_eye"] > 0.5


def _png(image: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))
    assert ok
    return data.tobytes()


def test_detection_threshold_end_to_end_and_no_face_exit_code(open_mesh: LocalMesh, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--det-thresh reaches the gateway: at 0.99 the mouth-covered astronaut (BlazeFace 0.81) is missed and the
    run exits 1 (README: no face found is a failure); a rerun at the default threshold retries it and finds it.
    A crop the face fills (BlazeFace 0.08 on it) is found too."""
    import skimage.data

    astronaut = skimage.data.astronaut()
    covered = astronaut.copy()
    covered[125:185, 195:260] = (224, 172, 140)  # a hand-coloured block over the mouth and chin
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "covered.png").write_bytes(_png(covered))
    out = tmp_path / "out"
    base = ["detect", str(folder), "-o", str(out), "--gateway", open_mesh.gateway_address, "--no-progress"]
    capsys.readouterr()
    assert main([*base, "--det-thresh", "0.99"]) == 1
    assert "no face found in 1 image(s)" in capsys.readouterr().err
    (line,) = _results(out)
    assert line["status"] == "NOT_FOUND" and line["face_index"] == -1
    assert main(base) == 0  # retried (not skipped as done), found at the default threshold
    assert "1 image(s) processed, 0 already done" in capsys.readouterr().out
    assert [(e["status"], e["found_by"]) for e in _results(out)] == [("OK", "detector")]

    crop_folder = tmp_path / "crop"
    crop_folder.mkdir()
    (crop_folder / "tight.png").write_bytes(_png(np.ascontiguousarray(astronaut[88:158, 192:262])))
    crop_out = tmp_path / "crop-out"
    assert main(["detect", str(crop_folder), "-o", str(crop_out), "--gateway", open_mesh.gateway_address,
                 "--no-progress"]) == 0
    (face,) = _results(crop_out)
    assert face["status"] == "OK" and face["found_by"] == "zoom_out"


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "nan", "high"])
def test_bad_detection_threshold_is_a_usage_error(tmp_path: Path, value: str) -> None:
    """Client and gateway refuse it before any work: exit 2, one line, no traceback."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    (tmp_path / "a.jpg").write_bytes(b"x")
    for command in (
        [sys.executable, "-m", "facefuse.client.cli", "detect", str(tmp_path / "a.jpg"), "-o", str(tmp_path / "o"),
         "--gateway", "127.0.0.1:1", "--det-thresh", value],
        [sys.executable, "-m", "facefuse.servers.gateway", "--port", "0", "--det-thresh", value],
    ):
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert "--det-thresh" in run.stderr and "between 0 and 1" in run.stderr, run.stderr
    gateway = subprocess.run([sys.executable, "-m", "facefuse.servers.gateway", "--port", "0"], capture_output=True,
                             text=True, env={**env, "FACEFUSE_DET_THRESH": value}, timeout=60)
    assert gateway.returncode == 2 and "between 0 and 1" in gateway.stderr, gateway.stderr


@pytest.mark.parametrize("command", [
    ["detect", "x.jpg", "-o", "out"],
    ["reconstruct", "x.jpg", "-o", "out"],
    ["mesh", "up"],
    ["demo"],
    ["bench", "occlusion", "--images", "x", "--local", "-o", "out"],
])
def test_every_entry_point_refuses_a_bad_threshold_before_any_work(command: list[str],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--det-thresh", "1.2"])
    assert stopped.value.code == 2
    assert "--det-thresh" in capsys.readouterr().err


def test_mesh_up_det_thresh_sets_the_gateways_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`facefuse mesh up --det-thresh 0.99`: a request without its own threshold gets the gateway's, so the
    mouth-covered astronaut (BlazeFace 0.81) is not found; a request's own --det-thresh still wins."""
    import signal

    import skimage.data

    covered = skimage.data.astronaut().copy()
    covered[125:185, 195:260] = (224, 172, 140)
    photo = tmp_path / "covered.png"
    photo.write_bytes(_png(covered))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FACEFUSE_ASSETS": ""}
    mesh = subprocess.Popen([sys.executable, "-m", "facefuse.client.cli", "mesh", "up", "--det-thresh", "0.99"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    try:
        import queue
        import threading

        lines: queue.Queue[str] = queue.Queue()
        assert mesh.stdout is not None
        threading.Thread(target=lambda: [lines.put(line) for line in mesh.stdout], daemon=True).start()
        address = None
        while address is None:
            line = lines.get(timeout=180)  # queue.Empty: mesh up did not get ready in time
            if line.startswith("gateway ready at "):
                address = line.split()[3].rstrip(";")
        base = ["detect", str(photo), "--gateway", address, "--no-progress"]
        assert main([*base, "-o", str(tmp_path / "strict")]) == 1
        assert [e["status"] for e in _results(tmp_path / "strict")] == ["NOT_FOUND"]
        assert main([*base, "-o", str(tmp_path / "own"), "--det-thresh", "0.5"]) == 0
    finally:
        os.killpg(mesh.pid, signal.SIGTERM)
        mesh.wait(timeout=60)
