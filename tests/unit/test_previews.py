"""Previews off the result path: the worker pool writes the same images as drawing inline, --no-preview
leaves them out, a failed render is taken off the face's line, and overlay.png shows the posed mesh."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.spatial.transform import Rotation

from facefuse.assets.synthetic.flame import synthetic_flame_mesh
from facefuse.client.outputs import PreviewWriter, overlay, posed_overlay, write_face
from facefuse.client.posed import load_posed
from facefuse.client.validate import CheckedFace, CheckedReconstruction
from facefuse.io.atomic import write_npz_atomic
from facefuse.io.meshes import write_obj


def _face(topology: str = "flame2020") -> CheckedFace:
    vertices, faces = synthetic_flame_mesh("small")
    vertices = vertices * 1000.0
    spread = np.linspace(0.0, 6.0, len(vertices)).astype(np.float32)
    rec = CheckedReconstruction(method="fuse", strategy="test", confidence=0.5, fallback="", topology=topology,
                                vertices=vertices.astype(np.float32), faces=faces, vertex_spread=spread)
    return CheckedFace(face_index=0, num_faces=1, seconds=0.1, box=np.array([40.0, 30.0, 160.0, 170.0]), score=0.9,
                       detector="test", kps5=np.array([[70.0, 80], [130, 80], [100, 110], [75, 140], [125, 140]]),
                       reconstruction=rec)


def _photo() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(200, 200, 3), dtype=np.uint8)


def test_pool_writes_the_same_previews_as_inline(tmp_path):
    face, photo = _face(), _photo()
    inline = write_face(tmp_path / "inline", "img", face, photo)
    pool = PreviewWriter(workers=2, pending=2)
    pooled = write_face(tmp_path / "pooled", "img", face, photo, previews=pool)
    assert pool.close() == 0
    assert sorted(pooled["files"]) == sorted(inline["files"])
    for name in ("preview.png", "uncertainty.png", "overlay.png"):
        relative = f"img/face_00/{name}"
        assert relative in pooled["files"]
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pooled" / relative)),
                                      np.asarray(Image.open(tmp_path / "inline" / relative)))


def test_no_preview_leaves_the_rendered_previews_out(tmp_path):
    entry = write_face(tmp_path, "img", _face(), _photo(), preview=False, previews=PreviewWriter(workers=1))
    names = {f.rsplit("/", 1)[1] for f in entry["files"]}
    assert {"mesh.obj", "mesh.ply", "uncertainty.npy", "overlay.png"} <= names
    assert not names & {"preview.png", "uncertainty.png"}
    assert not (tmp_path / "img/face_00/preview.png").exists()


def test_a_failed_render_is_taken_off_the_faces_line(tmp_path):
    pool = PreviewWriter(workers=1)
    files: list[str] = []
    draw = pool.draw_for(tmp_path, files)

    def broken() -> np.ndarray:
        raise ValueError("no pixels today")

    draw(tmp_path / "a" / "bad.png", broken)
    draw(tmp_path / "a" / "good.png", lambda: np.zeros((4, 4, 3), np.uint8))
    assert files == ["a/bad.png", "a/good.png"]  # listed at once, so the face's line can be written now
    assert pool.close() == 1
    assert files == ["a/good.png"] and (tmp_path / "a" / "good.png").is_file()
    assert not (tmp_path / "a" / "bad.png").exists()


def test_overlay_png_shows_the_posed_mesh_when_the_face_has_one(tmp_path):
    face, photo = _face("test-topology"), _photo()  # not flame2020: write_face writes no params.npz of its own
    target = tmp_path / "img" / "face_00"
    vertices, faces = face.reconstruction.vertices, face.reconstruction.faces
    rotvec = Rotation.from_euler("x", 180, degrees=True).as_rotvec()
    shift = np.array([0.0, 0.0, 700.0])
    posed = vertices.astype(np.float64) @ Rotation.from_rotvec(rotvec).as_matrix().T + shift
    k = np.array([[500.0, 0, 100.0], [0, 500.0, 100.0], [0, 0, 1]])
    write_obj(target / "mesh_posed.obj", posed, faces)
    write_npz_atomic(target / "params.npz", {"global_pose": rotvec, "translation": shift, "camera_intrinsics": k})
    write_face(tmp_path, "img", face, photo)
    loaded = load_posed(target)
    assert loaded is not None
    np.testing.assert_allclose(loaded.model_space(), vertices, atol=1e-3)
    drawn = np.asarray(Image.open(target / "overlay.png"))
    np.testing.assert_array_equal(drawn, posed_overlay(photo, face.box, face.kps5, loaded))
    plain = overlay(photo, face.box, face.kps5, None)
    assert drawn.shape == plain.shape
    changed = (drawn != plain).any(axis=2)
    centre = changed[changed.shape[0] // 2 - 10:changed.shape[0] // 2 + 10, changed.shape[1] // 2 - 10:
                     changed.shape[1] // 2 + 10]
    assert centre.mean() > 0.9  # the mesh covers the middle of the face's neighbourhood
    assert not changed[:3, :3].any()  # and not the corner
