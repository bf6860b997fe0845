"""Video: the IoU tracker, the One Euro filter (vectors and rotations), video files in and out, and a
synthetic video through the client's video step (tracks, identity, smoothing, overlay.mp4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from facefuse.assets.synthetic.flame import synthetic_flame_mesh
from facefuse.errors import InvalidInputError
from facefuse.io.video import FrameReader, video_info, write_video
from facefuse.tracking import (
    ROTATION_FILTER,
    TRANSLATION_FILTER,
    OneEuro,
    rotation_jitter_deg,
    smooth_rotations,
    smooth_vectors,
    track_boxes,
    vector_jitter,
)

from video_fixtures import FACE_TOWARD_CAMERA, FPS, camera, noisy_static_pose, posed_mesh, synthetic_video_run


def test_tracker_follows_boxes_across_gaps_and_starts_new_tracks():
    a = np.array([10.0, 10, 50, 50])
    b = np.array([100.0, 20, 150, 80])
    frames = [
        np.array([a, b]),
        np.array([b + 3, a + 2]),  # order swapped: matching is by overlap, not by position in the list
        np.array([a + 4]),  # b missing for one frame
        np.array([b + 6, a + 6, [300, 300, 340, 340]]),  # b comes back (gap 1 <= max_gap), a third face appears
        np.zeros((0, 4)),
        np.zeros((0, 4)),
        np.zeros((0, 4)),
        np.array([[300.0, 300, 340, 340]]),  # after 3 empty frames: too late, a new track
    ]
    tracks = track_boxes(frames, iou_threshold=0.3, max_gap=2)
    assert tracks == [[(0, 0), (1, 1), (2, 0), (3, 1)], [(0, 1), (1, 0), (3, 0)], [(3, 2)], [(7, 0)]]
    with pytest.raises(InvalidInputError):
        track_boxes(frames, iou_threshold=0.0)


def test_one_euro_takes_the_jitter_out_of_a_static_pose():
    count = 100
    truth, rotations, translations = noisy_static_pose(count, seed=0)
    times = np.arange(count) / FPS
    smooth_r = smooth_rotations(rotations, times, ROTATION_FILTER)
    smooth_t = smooth_vectors(translations, times, TRANSLATION_FILTER)
    raw_jitter, smooth_jitter = rotation_jitter_deg(rotations), rotation_jitter_deg(smooth_r)
    # measured: 1° RMS noise per frame -> ~1.4° frame-to-frame raw, ~0.2° smoothed (about 7x less)
    assert smooth_jitter < 0.25 * raw_jitter, (raw_jitter, smooth_jitter)
    assert vector_jitter(smooth_t) < 0.25 * vector_jitter(translations)
    # and no bias: after the first second the smoothed pose stays near the truth, nearer than the raw one
    settled = slice(int(FPS), None)
    error_raw = (Rotation.from_rotvec(rotations[settled]) * truth.inv()).magnitude()
    error_smooth = (Rotation.from_rotvec(smooth_r[settled]) * truth.inv()).magnitude()
    assert np.degrees(error_smooth).mean() < 0.6 * np.degrees(error_raw).mean()


def test_rotation_filter_follows_a_turn_and_crosses_pi():
    count = 75
    times = np.arange(count) / FPS
    # a steady 60°/s turn about the vertical axis that passes through 180° (the axis-angle numbers flip there)
    angles = np.deg2rad(150.0 + 60.0 * times)
    rotations = Rotation.from_euler("y", angles[:, None]).as_rotvec()
    assert np.abs(np.diff(rotations[:, 1])).max() > 3.0  # the raw numbers jump at ±π ...
    smoothed = Rotation.from_rotvec(smooth_rotations(rotations, times))
    lag = np.degrees((smoothed * Rotation.from_euler("y", angles[:, None]).inv()).magnitude())
    assert lag.max() < 15.0  # ... the filtered rotation does not: it lags a few degrees behind, never flips
    assert rotation_jitter_deg(smoothed.as_rotvec()) < 1.2 * rotation_jitter_deg(rotations)


def test_filter_input_checks():
    with pytest.raises(InvalidInputError):
        OneEuro(min_cutoff_hz=0.0)
    with pytest.raises(InvalidInputError):
        smooth_vectors(np.zeros((3, 2)), np.array([0.0, 0.0, 1.0]), TRANSLATION_FILTER)
    one = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(smooth_vectors(one, np.array([0.0]), TRANSLATION_FILTER), one)


def test_video_files_round_trip(tmp_path):
    frames = [np.full((31, 45, 3), 20 * i, np.uint8) for i in range(8)]
    path = write_video(tmp_path / "clip.mp4", frames, fps=FPS)
    info = video_info(path)
    assert (info.frames, info.width, info.height) == (8, 46, 32)  # padded to even sizes for yuv420p
    assert info.fps == pytest.approx(FPS)
    reader = FrameReader(path)
    for index in (5, 2, 7):  # backward and forward
        assert abs(float(reader.frame(index)[:31, :45].mean()) - 20 * index) < 3
    with pytest.raises(InvalidInputError):
        reader.frame(8)
    with pytest.raises(InvalidInputError):
        write_video(tmp_path / "bad.mp4", [frames[0], frames[1][:10]], fps=FPS)
    assert not (tmp_path / "bad.mp4").exists() and not list(tmp_path.glob(".*partial*"))
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(InvalidInputError):
        video_info(tmp_path / "junk.mp4")


def test_synthetic_video_end_to_end_smooths_a_static_face(tmp_path):
    from facefuse.client.video import write_video_outputs

    count = 40
    out, items, frames = synthetic_video_run(tmp_path, count)
    timings: list[float] = []
    summary, = write_video_outputs(out, items, "fuse", timings=timings)
    assert len(timings) == count
    track, = summary["tracks"]
    assert track["frames"] == list(range(count)) and track["posed_frames"] == count
    jitter = track["jitter"]
    # the measurement of issue 14: the smoothed pose of a static face varies less than the raw one
    assert jitter["rotation_deg"] < 0.3 * jitter["rotation_deg_raw"], jitter
    assert jitter["translation_mm"] < 0.3 * jitter["translation_mm_raw"], jitter
    assert json.loads((out / summary["overlay"]).with_name("video.json").read_text())["tracks"][0]["jitter"] == jitter
    poses = np.load(out / track["dir"] / "poses.npz")
    assert poses["global_pose"].shape == (count, 3) and poses["expression"].shape == (count, 10)
    assert (out / track["dir"] / "mesh.obj").is_file()  # the track's fused identity
    info = video_info(out / summary["overlay"])
    assert (info.frames, info.width, info.height) == (count, 192, 192)
    # the overlay shows the mesh where the face is (blended over the frame), the frame elsewhere
    drawn = FrameReader(out / summary["overlay"]).frame(count // 2).astype(float)
    source = frames[count // 2].astype(float)
    assert drawn[96, 96, 1] - source[96, 96, 1] > 20  # the grey mesh blended over the skin-coloured face
    assert np.abs(drawn[:6, :20] - source[:6, :20]).mean() < 4  # ... and not on the background (clear of the box)


def test_two_people_make_two_tracks(tmp_path):
    from facefuse.client.video import write_video_outputs

    out, items, _ = synthetic_video_run(tmp_path, 12, second_face_from=5)
    summary, = write_video_outputs(out, items, "fuse")
    assert [t["frames"] for t in summary["tracks"]] == [list(range(12)), list(range(5, 12))]


def test_smooth_track_of_one_frame_gives_back_the_posed_mesh():
    from facefuse.client.posed import PosedFace
    from facefuse.client.video import smooth_track

    vertices, faces = synthetic_flame_mesh("small")
    neutral = vertices * 1000.0
    expression_offsets = np.random.default_rng(0).normal(scale=2.0, size=neutral.shape)
    rotvec, shift = (Rotation.from_euler("y", 30, degrees=True) * FACE_TOWARD_CAMERA).as_rotvec(), np.array(
        [5.0, 0.0, 500.0])
    posed = PosedFace(posed_mesh(neutral + expression_offsets, rotvec, shift), faces, camera(100), rotvec, shift, None)
    result = smooth_track([posed], np.array([0.0]), identity_mm=neutral, neutrals=[neutral])
    np.testing.assert_allclose(result.vertices[0], posed.vertices_cam_mm, atol=1e-9)
    other_identity = neutral * 1.1  # a different fused identity changes the mesh, not the pose
    moved = smooth_track([posed], np.array([0.0]), identity_mm=other_identity, neutrals=[neutral]).vertices[0]
    expected = posed_mesh(other_identity + expression_offsets, rotvec, shift)
    np.testing.assert_allclose(moved, expected, atol=1e-9)


def test_a_video_gone_after_the_run_gets_an_error_summary_not_a_traceback(tmp_path):
    from facefuse.client.video import write_video_outputs

    out, items, _ = synthetic_video_run(tmp_path, 3)
    items[0].path.write_bytes(b"no longer a video")
    summary, = write_video_outputs(out, items, "fuse")
    assert summary["tracks"] == [] and "not a readable video" in summary["error"]
