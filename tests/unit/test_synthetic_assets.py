"""Synthetic official-format files: exact key lists, the chumpy-free reader, refusals, manifest, mesh sanity."""

from __future__ import annotations

import io
import json
import pickle
import pickletools

import numpy as np
import pytest
import scipy.sparse
import torch

from facefuse.assets import synthetic
from facefuse.assets.flame_file import (
    FLAME_MASK_REGIONS,
    load_flame_masks,
    load_flame_model,
    load_landmark_embedding,
    validate_flame2020_model,
)
from facefuse.assets.registry import SYNTHETIC_MANIFEST, check_asset, spec
from facefuse.assets.synthetic.flame import (
    FLAME_SIZES,
    flame_generator,
    flame_model_fields,
    synthetic_flame_mesh,
    write_flame_model,
)
from facefuse.assets.synthetic.mica import flame_model_state
from facefuse.errors import AssetError


def _rows(state: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], str]]:
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]


def _globals_in(blob: bytes) -> set[str]:
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(blob) if op.name == "GLOBAL"}


# ------------------------------------------------------------------ mica.tar against the official dumps


def test_synthetic_mica_tar_arcface_section_equals_official_list(synthetic_assets, official_keys):
    checkpoint = torch.load(synthetic_assets.path("mica"), map_location="cpu", weights_only=True)
    assert sorted(checkpoint) == ["arcface", "flameModel"]
    assert _rows(checkpoint["arcface"]) == official_keys("mica_arcface")
    # small size: same keys and dtypes; only the FLAME vertex/face dimensions are smaller
    small = _rows(checkpoint["flameModel"])
    official = official_keys("mica_flameModel")
    assert [(k, d) for k, _, d in small] == [(k, d) for k, _, d in official]
    n_v = FLAME_SIZES["small"].num_vertices
    assert dict((k, s) for k, s, _ in small)["generator.posedirs"] == (36, 3 * n_v)


def test_full_size_flame_model_section_equals_official_list(official_keys):
    state = flame_model_state("full", torch.Generator().manual_seed(0))
    assert _rows(state) == official_keys("mica_flameModel")


# ------------------------------------------------------------------ FLAME pickle


def test_flame_pickle_is_in_the_chumpy_format_and_reads_without_chumpy(synthetic_assets):
    path = synthetic_assets.path("flame2020")
    blob = path.read_bytes()
    names = _globals_in(blob)
    assert {"chumpy.ch.Ch", "scipy.sparse.csc.csc_matrix"} <= names
    assert not any(n.startswith("facefuse") for n in names)
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(blob, encoding="latin1")  # needs chumpy, like the real file
    data = load_flame_model(path, expect="2020")
    fields = flame_model_fields("small", flame_generator(torch.Generator().manual_seed(0)))
    n_v = FLAME_SIZES["small"].num_vertices
    np.testing.assert_array_equal(data.faces, fields["f"].astype(np.int64))
    np.testing.assert_allclose(data.v_template, fields["v_template"], atol=1e-7)
    np.testing.assert_allclose(data.shapedirs, fields["shapedirs"], atol=1e-7)
    np.testing.assert_allclose(data.posedirs, fields["posedirs"].reshape(3 * n_v, 36).T, atol=1e-7)
    np.testing.assert_allclose(data.J_regressor, fields["J_regressor"], atol=1e-7)
    np.testing.assert_allclose(data.lbs_weights, fields["weights"], atol=1e-7)
    assert data.parents.tolist() == [-1, 0, 1, 1, 1]
    assert data.version == "2020" and data.shapedirs.shape == (n_v, 3, 400)
    local = blob.replace(b"cchumpy.ch\nCh\n", b"cfacefuse.assets.synthetic.flame\n_AsChumpyCh\n")
    local = local.replace(b"cscipy.sparse.csc\ncsc_matrix\n", b"cfacefuse.assets.synthetic.flame\n_AsScipyCsc\n")
    raw = pickle.loads(local, encoding="latin1")
    assert raw["f"].dtype == np.uint32 and raw["bs_style"] == "lbs" and raw["bs_type"] == "lrotmin"


def test_flame_reader_refuses_truncated_random_and_foreign_pickles(synthetic_assets, tmp_path):
    blob = synthetic_assets.path("flame2020").read_bytes()
    cases = {
        "truncated.pkl": blob[: len(blob) // 2],
        "random.pkl": np.random.default_rng(0).bytes(2048),
        "evil.pkl": b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.",
        "list.pkl": pickle.dumps([1, 2, 3], protocol=2),
        "fields.pkl": pickle.dumps({"v_template": np.zeros((3, 3))}, protocol=2),
        "chumpy_op.pkl": blob.replace(b"cchumpy.ch\nCh\n", b"cchumpy.ch_ops\nsin\n"),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(AssetError, match=name) as info:
            load_flame_model(tmp_path / name)
        assert "FLAME" in str(info.value)
    assert "os.system" in _message(lambda: load_flame_model(tmp_path / "evil.pkl"))
    assert "missing field" in _message(lambda: load_flame_model(tmp_path / "fields.pkl"))
    assert "chumpy.ch_ops.sin" in _message(lambda: load_flame_model(tmp_path / "chumpy_op.pkl"))
    with pytest.raises(AssetError, match="not found"):
        validate_flame2020_model(tmp_path / "absent.pkl")


def _message(call) -> str:
    with pytest.raises(AssetError) as info:
        call()
    return str(info.value)


def test_flame_2023_style_file_is_refused_where_2020_is_required(tmp_path):
    path = tmp_path / "flame2023.pkl"
    write_flame_model(path, "small", torch.Generator().manual_seed(0), chumpy=False)
    assert not any(n.startswith("chumpy") for n in _globals_in(path.read_bytes()))
    message = _message(lambda: load_flame_model(path, expect="2020"))
    assert "2023" in message and "--flame-version" in message and str(path) in message
    data = load_flame_model(path, expect="any")
    assert data.version == "2023" and data.num_vertices == FLAME_SIZES["small"].num_vertices
    assert load_flame_model(path, expect="2023").version == "2023"


def test_reader_handles_chumpy_reordering_and_sparse_variants(tmp_path):
    """Select/Reshape/transpose chumpy nodes and a csr J_regressor evaluate to the same arrays."""
    from facefuse.assets.flame_file import RestrictedUnpickler, to_array

    def stand_in(module: str, name: str, state: dict):
        cls = RestrictedUnpickler(io.BytesIO(b"")).find_class(module, name)
        obj = cls.__new__(cls)
        obj.__setstate__(state)
        return obj

    base = np.arange(24.0).reshape(2, 3, 4)
    ch = stand_in("chumpy.ch", "Ch", {"x": base})
    select = stand_in("chumpy.reordering", "Select", {"a": ch, "idxs": np.array([5, 1, 7]), "preferred_shape": (3, 1)})
    np.testing.assert_array_equal(to_array(select), base.ravel()[[5, 1, 7]].reshape(3, 1))
    np.testing.assert_array_equal(
        to_array(stand_in("chumpy.reordering", "transpose", {"a": ch, "axes": (2, 0, 1)})), base.transpose(2, 0, 1)
    )
    np.testing.assert_array_equal(
        to_array(stand_in("chumpy.reordering", "Reshape", {"a": ch, "newshape": (6, 4)})), base.reshape(6, 4)
    )
    dense = np.array([[0.0, 2.0], [3.0, 0.0]])
    csr = scipy.sparse.csr_matrix(dense)
    sparse = stand_in(
        "scipy.sparse.csr",
        "csr_matrix",
        {"data": csr.data, "indices": csr.indices, "indptr": csr.indptr, "_shape": (2, 2)},
    )
    np.testing.assert_array_equal(to_array(sparse).toarray(), dense)
    with pytest.raises(ValueError, match=r"chumpy\.ch_ops\.sin"):  # inert when loaded, refused when evaluated
        to_array(stand_in("chumpy.ch_ops", "sin", {"x": ch}))


# ------------------------------------------------------------------ landmark embedding and masks


def test_landmark_embedding_format_and_reader(synthetic_assets, tmp_path):
    path = synthetic_assets.path("landmark_embedding")
    raw = np.load(path, allow_pickle=True).item()  # the test wrote it, so a plain load is fine here
    assert isinstance(raw["dynamic_lmk_faces_idx"], torch.Tensor) and raw["dynamic_lmk_faces_idx"].dtype == torch.int64
    assert (
        isinstance(raw["dynamic_lmk_bary_coords"], torch.Tensor)
        and raw["dynamic_lmk_bary_coords"].dtype == torch.float32
    )
    assert isinstance(raw["static_lmk_faces_idx"], np.ndarray)
    embedding = load_landmark_embedding(path, num_faces=FLAME_SIZES["small"].num_faces)
    np.testing.assert_array_equal(embedding.dynamic_lmk_faces_idx, raw["dynamic_lmk_faces_idx"].numpy())
    np.testing.assert_array_equal(embedding.full_lmk_faces_idx, raw["full_lmk_faces_idx"])
    np.testing.assert_allclose(embedding.full_lmk_bary_coords.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(embedding.static_lmk_faces_idx, embedding.full_lmk_faces_idx[0, 17:])

    evil = tmp_path / "evil.npy"
    holder = np.empty((), dtype=object)
    holder[()] = {"static_lmk_faces_idx": io.StringIO("x")}
    np.save(evil, holder, allow_pickle=True)
    with pytest.raises(AssetError, match=r"evil\.npy.*_io\.StringIO"):
        load_landmark_embedding(evil)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros(3))
    with pytest.raises(AssetError, match="0-d object array"):
        load_landmark_embedding(plain)


def test_masks_have_all_regions_with_valid_indices(synthetic_assets, tmp_path):
    masks = load_flame_masks(synthetic_assets.path("flame_masks"), num_vertices=FLAME_SIZES["small"].num_vertices)
    assert set(FLAME_MASK_REGIONS) <= set(masks)
    assert all(m.dtype == np.int64 and m.size > 0 for m in masks.values())
    bad = tmp_path / "FLAME_masks.pkl"
    bad.write_bytes(pickle.dumps({"face": np.arange(3)}, protocol=2))
    with pytest.raises(AssetError, match="missing region"):
        load_flame_masks(bad)


# ------------------------------------------------------------------ synthesize, manifest, sizes, mesh


def test_assets_check_labels_the_files_valid_and_synthetic(synthetic_assets):
    directory = synthetic_assets.path("flame2020").parents[1]
    for name in ("flame2020", "landmark_embedding", "flame_masks", "mica"):
        synthetic_assets.path(name)
        status = check_asset(directory, spec(name))
        assert status.found and status.valid and status.synthetic, (name, status.message)
    manifest = json.loads((directory / SYNTHETIC_MANIFEST).read_text())
    assert manifest["size"] == "small" and manifest["seed"] == 0
    assert not list(directory.rglob(".*.tmp-*"))


def test_synthesize_is_reproducible_and_skips_missing_writers(tmp_path, monkeypatch):
    first = synthetic.synthesize(tmp_path / "a", size="small", seed=5, only={"flame_masks", "landmark_embedding"})
    second = synthetic.synthesize(
        tmp_path / "b", size="small", seed=5, only={"FLAME2020/FLAME_masks.pkl", "landmark_embedding"}
    )
    assert set(first) == set(second) == {"FLAME2020/FLAME_masks.pkl", "FLAME2020/landmark_embedding.npy"}
    for relpath in first:
        assert first[relpath].read_bytes() == second[relpath].read_bytes()
    other = synthetic.synthesize(tmp_path / "c", size="small", seed=6, only={"landmark_embedding"})
    assert (
        other["FLAME2020/landmark_embedding.npy"].read_bytes() != first["FLAME2020/landmark_embedding.npy"].read_bytes()
    )

    monkeypatch.setitem(synthetic.WRITERS, "frontindices.npy", ("facefuse.assets.synthetic.not_written_yet", "write"))
    messages = []
    written = synthetic.synthesize(
        tmp_path / "d", size="small", only={"frontindices"}, progress=lambda r, s: messages.append((r, s))
    )
    assert written == {} and messages and messages[0][0] == "frontindices.npy" and "skipped" in messages[0][1]
    with pytest.raises(ValueError, match="no synthetic writer"):
        synthetic.synthesize(tmp_path / "e", only={"not-an-asset"})


@pytest.mark.parametrize("size", ["small", "full"])
def test_synthetic_mesh_is_a_sane_head_surface(size):
    spec_ = FLAME_SIZES[size]
    vertices, faces = synthetic_flame_mesh(size)
    assert vertices.shape == (spec_.num_vertices, 3) and faces.shape == (spec_.num_faces, 3)
    if size == "full":
        assert (spec_.num_vertices, spec_.num_faces, spec_.num_shapedirs, spec_.num_joints) == (5023, 9976, 400, 5)
    assert spec_.num_vertices >= 1785
    assert faces.min() == 0 and faces.max() == spec_.num_vertices - 1
    assert np.unique(faces).size == spec_.num_vertices  # every vertex is used
    assert (
        np.all(faces[:, 0] != faces[:, 1]) and np.all(faces[:, 1] != faces[:, 2]) and np.all(faces[:, 0] != faces[:, 2])
    )
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    assert area.min() > 0.0
    assert np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0 > 0.0  # outward-facing triangles
    extent = vertices.max(axis=0) - vertices.min(axis=0)
    assert np.all((extent > 0.12) & (extent < 0.3))  # head-sized, metres
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert counts.max() <= 2  # a manifold surface
