"""OFER IdRank: official layout, strict loading, corruption errors, features, scores, order independence."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from facefuse.assets.idrank_checkpoint import (
    check_idrank_checkpoint,
    expected_idrank_sections,
    load_farl_weights,
    load_front_indices,
    load_idrank,
    validate_farl_weights,
    validate_front_indices,
    validate_idrank_checkpoint,
)
from facefuse.assets.synthetic.ofer_idrank import (
    synthetic_front_indices,
    write_farl_weights,
    write_front_indices,
    write_idrank_checkpoint,
)
from facefuse.errors import AssetError, CheckpointError, InvalidInputError
from facefuse.models.clip_vit import ClipViT
from facefuse.models.idrank import IdRank, RankMLPNet, rank_features, rank_pool

KEYS_DIR = Path(__file__).resolve().parents[1] / "data" / "official_keys"
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _official(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    rows = [line.split("\t") for line in (KEYS_DIR / name).read_text().splitlines() if line.strip()]
    return {k: (tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), dtype) for k, shape, dtype in rows}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("idrank")
    paths = {"tar": root / "model_idrank.tar", "farl": root / "farl.pth", "front": root / "frontindices.npy"}
    write_idrank_checkpoint(paths["tar"], "full", torch.Generator().manual_seed(1))
    write_farl_weights(paths["farl"], "full", torch.Generator().manual_seed(2))
    write_front_indices(paths["front"], "full", torch.Generator().manual_seed(3))
    return paths


@pytest.fixture(scope="module")
def model(files: dict[str, Path]) -> IdRank:
    return load_idrank(files["tar"], front_indices_path=files["front"], farl_path=files["farl"])


@pytest.fixture(scope="module")
def tar_lazy(files: dict[str, Path]) -> dict:
    """The written checkpoint, memory-mapped (no second 1 GB copy)."""
    return torch.load(files["tar"], map_location="cpu", weights_only=True, mmap=True)


def _meta_checkpoint() -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint with the official layout made of meta tensors: shapes and dtypes, no memory."""
    return {section: {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in expected.items()}
            for section, expected in expected_idrank_sections().items()}


# ------------------------------------------------------------------------------------------------
# Layout


@pytest.mark.parametrize(
    "section, tsv", [("net", "idrank_net.tsv"), ("arcface", "idrank_arcface.tsv"), ("farl", "idrank_farl.tsv")]
)
def test_expected_sections_equal_official_key_lists(section: str, tsv: str) -> None:
    expected = expected_idrank_sections()[section]
    official = _official(tsv)
    assert list(expected) == list(official)
    assert {k: (shape, str(dtype).removeprefix("torch.")) for k, (shape, dtype) in expected.items()} == official


def test_rank_net_construction_replays_official_rng_order() -> None:
    """Per layer: Linear mlp (weight, bias), Linear scale (weight, bias), Linear shift (weight only)."""
    import math

    widths, ctx = (24, 16, 16, 8, 8, 1), 5

    def linear(out_f: int, in_f: int, bias: bool) -> list[torch.Tensor]:
        w = torch.empty(out_f, in_f)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        return [w, torch.empty(out_f).uniform_(-in_f ** -0.5, in_f ** -0.5)] if bias else [w]

    torch.manual_seed(77)
    expected = {}
    for i in range(5):
        p = f"ranklayers.{i}."
        expected[p + "mlp.weight"], expected[p + "mlp.bias"] = linear(widths[i + 1], widths[i], True)
        expected[p + "scale.weight"], expected[p + "scale.bias"] = linear(widths[i + 1], ctx, True)
        (expected[p + "shift.weight"],) = linear(widths[i + 1], ctx, False)
    after = torch.get_rng_state()
    torch.manual_seed(77)
    net = RankMLPNet(widths, ctx)
    assert torch.equal(torch.get_rng_state(), after)
    state = net.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert set(state) - set(expected) == {f"ranklayers.{i}.gn.{w}" for i in range(4) for w in ("weight", "bias")}


def test_rank_net_module_tree_has_the_33_official_keys() -> None:
    with torch.device("meta"):
        net = RankMLPNet()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {
        k: s for k, (s, _) in _official("idrank_net.tsv").items()
    }


def test_synthetic_files_validate_and_load_strictly(files: dict[str, Path], model: IdRank, tar_lazy: dict) -> None:
    assert "net 33 keys, arcface 925 keys, farl 302 keys" in validate_idrank_checkpoint(files["tar"])
    assert "302 of 302 CLIP keys matched" in validate_farl_weights(files["farl"])
    assert "1785 vertices in [16, 3928]" in validate_front_indices(files["front"])
    # every section landed in its module, and the tar's farl section overrides the FaRL .pth
    for section in ("net", "arcface", "farl"):
        state = getattr(model, section).state_dict()
        for key in list(tar_lazy[section])[:: max(1, len(tar_lazy[section]) // 40)]:
            assert torch.equal(state[key], tar_lazy[section][key]), (section, key)
    farl_pth = torch.load(files["farl"], map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    assert not torch.equal(model.farl.visual.proj, farl_pth["visual.proj"])


# ------------------------------------------------------------------------------------------------
# Corruption: each fails naming the section and key.


def test_meta_checkpoint_passes() -> None:
    check_idrank_checkpoint(_meta_checkpoint(), "ckpt")


@pytest.mark.parametrize(
    "section, key",
    [
        ("net", "ranklayers.2.shift.weight"),
        ("arcface", "layer3.7.conv2.weight"),
        ("farl", "visual.transformer.resblocks.5.attn.in_proj_weight"),
        ("farl", "token_embedding.weight"),
    ],
)
def test_renamed_key_is_named(section: str, key: str) -> None:
    ckpt = _meta_checkpoint()
    ckpt[section]["renamed." + key] = ckpt[section].pop(key)
    with pytest.raises(CheckpointError) as err:
        check_idrank_checkpoint(ckpt, "model_idrank.tar")
    message = str(err.value)
    assert f"section {section!r}" in message and repr(key) in message and "renamed." + key in message


@pytest.mark.parametrize("section, key, shape", [("net", "ranklayers.0.mlp.weight", (4096, 5355)),
                                                 ("arcface", "fc.weight", (512, 512)),
                                                 ("farl", "visual.positional_embedding", (50, 768))])
def test_wrong_shape_is_named(section: str, key: str, shape: tuple[int, ...]) -> None:
    ckpt = _meta_checkpoint()
    ckpt[section][key] = torch.empty(shape, device="meta")
    with pytest.raises(CheckpointError) as err:
        check_idrank_checkpoint(ckpt, "model_idrank.tar")
    assert f"section {section!r}" in str(err.value) and f"{key}: shape {shape}" in str(err.value)


def test_wrong_dtype_is_named() -> None:
    ckpt = _meta_checkpoint()
    ckpt["net"]["ranklayers.4.mlp.bias"] = torch.empty(1, dtype=torch.float16, device="meta")
    with pytest.raises(CheckpointError, match=r"ranklayers\.4\.mlp\.bias: dtype torch\.float16"):
        check_idrank_checkpoint(ckpt, "model_idrank.tar")


@pytest.mark.parametrize("missing", ["net", "arcface", "farl"])
def test_missing_section_file_fails_naming_it(tmp_path: Path, files: dict[str, Path], missing: str) -> None:
    path = tmp_path / "model_idrank.tar"
    torch.save({s: {} for s in ("net", "arcface", "farl") if s != missing}, path)
    with pytest.raises(CheckpointError, match=f"missing section.*'{missing}'"):
        validate_idrank_checkpoint(path)
    with pytest.raises(CheckpointError, match=f"'{missing}'"):
        load_idrank(path, front_indices_path=files["front"])


def test_unreadable_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model_idrank.tar"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"model_idrank\.tar"):
        validate_idrank_checkpoint(path)


# ------------------------------------------------------------------------------------------------
# FaRL .pth


def test_farl_loader_reports_matches_and_ignores_extras(files: dict[str, Path]) -> None:
    with torch.device("meta"):
        clip = ClipViT()
    clip.to_empty(device="cpu")
    report = load_farl_weights(clip, files["farl"])
    assert (report.matched, report.expected, report.missing) == (302, 302, ())
    assert "visual.mask_token" in report.unexpected and all(k.startswith("visual.") for k in report.unexpected)
    farl_pth = torch.load(files["farl"], map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    assert torch.equal(clip.visual.conv1.weight, farl_pth["visual.conv1.weight"])


def _small_farl(tmp_path: Path, state: dict[str, torch.Tensor], wrap: bool = True) -> Path:
    path = tmp_path / "farl.pth"
    torch.save({"state_dict": state} if wrap else state, path)
    return path


def test_unreadable_optional_farl_file_is_reported_not_fatal(tmp_path: Path, files: dict[str, Path],
                                                             model: IdRank) -> None:
    """The 'farl' section supplies every FaRL weight IdRank uses, so a bad .pth loses only its check."""
    bad = tmp_path / "FaRL.pth"
    bad.write_bytes(b"not a checkpoint")
    loaded = load_idrank(files["tar"], front_indices_path=files["front"], farl_path=bad)
    assert "ignored (unreadable" in loaded.load_report["farl_file"] and str(bad) in loaded.load_report["farl_file"]
    assert "matched" in model.load_report["farl_file"]
    mine, reference = loaded.state_dict(), model.state_dict()
    assert all(torch.equal(mine[k], reference[k]) for k in reference)


def test_farl_missing_image_tower_is_named(tmp_path: Path) -> None:
    path = _small_farl(tmp_path, {"visual.class_embedding": torch.zeros(768), "ln_final.weight": torch.zeros(512)})
    with pytest.raises(CheckpointError, match=r"image-tower key.*'visual\.positional_embedding'"):
        validate_farl_weights(path)


def test_farl_wrong_shape_and_missing_state_dict(tmp_path: Path) -> None:
    # The DDP prefix is stripped, then the shape checked.
    path = _small_farl(tmp_path, {"module.visual.proj": torch.zeros(768, 256)})
    with pytest.raises(CheckpointError, match=r"visual.proj: shape \(768, 256\), expected \(768, 512\)"):
        validate_farl_weights(path)
    path = _small_farl(tmp_path, {"visual.proj": torch.zeros(768, 512)}, wrap=False)
    with pytest.raises(CheckpointError, match="'state_dict'"):
        validate_farl_weights(path)


# ------------------------------------------------------------------------------------------------
# Front indices


def _write_npy(tmp_path: Path, array: np.ndarray) -> Path:
    path = tmp_path / "frontindices.npy"
    np.save(path, array)
    return path


def test_front_indices_corruptions(tmp_path: Path) -> None:
    good = synthetic_front_indices("full", torch.Generator().manual_seed(0))
    assert good.dtype == np.int64 and good.shape == (1785,) and (np.diff(good) > 0).all()
    assert (good[0], good[-1]) == (16, 3928)
    cases = {
        "int64": good.astype(np.int32),
        r"shape \(1785,\)": good[:-1],
        "strictly increasing": np.concatenate([good[:10], good[9:-1]]),   # duplicate
        "increasing": good[::-1].copy(),
        "outside the mesh": np.concatenate([good[:-1], [5023]]).astype(np.int64),
    }
    for message, array in cases.items():
        path = _write_npy(tmp_path, array)
        with pytest.raises(AssetError, match=message):
            validate_front_indices(path)
        assert str(path) in _error(path)
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(AssetError, match=r"obj\.npy"):
        load_front_indices(pickled)
    with pytest.raises(AssetError, match="not found"):
        load_front_indices(tmp_path / "absent.npy")


def _error(path: Path) -> str:
    try:
        validate_front_indices(path)
    except AssetError as exc:
        return str(exc)
    return ""


def test_small_front_indices_fit_the_small_mesh() -> None:
    from facefuse.assets.synthetic.ofer_idrank import _mesh_vertex_count

    a = synthetic_front_indices("small", torch.Generator().manual_seed(4))
    b = synthetic_front_indices("small", torch.Generator().manual_seed(4))
    assert np.array_equal(a, b)  # reproducible from the generator
    assert a.shape == (1785,) and (np.diff(a) > 0).all() and a[0] >= 0 and a[-1] < _mesh_vertex_count("small")


# ------------------------------------------------------------------------------------------------
# Features and scores against an independent numpy computation


def _np_features(vertices_m: np.ndarray, front: np.ndarray) -> np.ndarray:
    p = vertices_m.astype(np.float64)[:, front, :] * 1000.0
    mu = p.mean(axis=0)
    return np.stack([np.concatenate([mu.reshape(-1), (pn - mu).reshape(-1)]) for pn in p])


def _np_net(net_state: dict[str, torch.Tensor], x: np.ndarray, c: np.ndarray) -> np.ndarray:
    s = {k: v.double().numpy() for k, v in net_state.items()}
    n = x.shape[0]
    cc = np.repeat(c, n, axis=0)
    for i in range(5):
        p = f"ranklayers.{i}."
        y = x @ s[p + "mlp.weight"].T + s[p + "mlp.bias"]
        if i < 4:
            y = SELU_SCALE * np.where(y > 0, y, SELU_ALPHA * (np.exp(np.minimum(y, 0)) - 1))
            if n > 1:
                g = y.reshape(n, 8, -1)
                g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
                y = g.reshape(n, -1) * s[p + "gn.weight"] + s[p + "gn.bias"]
        scale = 1 / (1 + np.exp(-(cc @ s[p + "scale.weight"].T + s[p + "scale.bias"])))
        x = y * scale + cc @ s[p + "shift.weight"].T
    return x[:, 0]


def _candidates(n: int, seed: int, num_vertices: int = 5023) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, num_vertices, 3, generator=g) * 0.08          # a "face" ~ 8 cm scale, metres
    return base + torch.randn(n, num_vertices, 3, generator=g) * 0.003  # candidates differ by a few mm


def test_features_are_mean_then_residual_vertex_major(model: IdRank) -> None:
    v = _candidates(4, 0)
    front = model.front_indices.numpy()
    got = rank_features(v, model.front_indices)
    assert got.shape == (4, 10710) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), _np_features(v.numpy(), front), rtol=1e-5, atol=1e-3)
    # element 0..2 = mean xyz of the first front vertex (mm); element 5355.. = candidate 2's residual
    mu0 = v[:, front[0]].double().mean(0) * 1000
    np.testing.assert_allclose(got[2, :3].numpy(), mu0.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got[2, 5355:5358].numpy(), (v[2, front[0]].double() * 1000 - mu0).numpy(), atol=1e-3)


@pytest.fixture(params=[False, True], ids=["shipped-forward", "pool-scoring"])
def scoring(model: IdRank, request: pytest.FixtureRequest) -> Iterator[IdRank]:
    """The model scoring with the shipped forward (reproduce-official) and with forward_pool (fast numerics)."""
    model.pool_scoring = request.param
    yield model
    model.pool_scoring = False


@pytest.mark.parametrize("n", [1, 10])
def test_scores_match_independent_computation(scoring: IdRank, n: int) -> None:
    model = scoring
    v = _candidates(n, 1)
    c = torch.randn(1, 1024, generator=torch.Generator().manual_seed(2))
    got = model.score(v, c)
    ref = _np_net(model.net.state_dict(), _np_features(v.numpy(), model.front_indices.numpy()), c.double().numpy())
    assert got.shape == (n,) and torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))
    if n > 1:
        assert float(got.std()) > 1e-3  # synthetic weights give varied scores


def test_scores_follow_candidate_permutation_and_pool_size(scoring: IdRank) -> None:
    model = scoring
    v = _candidates(10, 3)
    c = torch.randn(1, 1024, generator=torch.Generator().manual_seed(4))
    scores = model.score(v, c)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    permuted = model.score(v[perm], c)
    torch.testing.assert_close(permuted, scores[perm], rtol=1e-5, atol=1e-5)
    assert int(permuted.argmax()) == int((perm == scores.argmax()).nonzero())
    # a pool of 11 (e.g. MICA's shape joins) is accepted; the shared mean changes, so do the scores
    bigger = model.score(torch.cat([v, _candidates(1, 6)]), c)
    assert bigger.shape == (11,) and torch.isfinite(bigger).all()
    assert not torch.allclose(bigger[:10], scores)


def test_pool_scoring_matches_the_shipped_forward(model: IdRank) -> None:
    """forward_pool computes the mean half and the context terms once: the same scores up to float32 rounding
    (measured ~1e-6 relative here), the same order; its inputs are checked."""
    for n, seed in ((10, 7), (2, 8), (64, 9)):
        v = _candidates(n, seed)
        c = torch.randn(1, 1024, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            shipped = model.net(rank_features(v, model.front_indices), c)
            mean, residuals = rank_pool(v, model.front_indices)
            pooled = model.net.forward_pool(mean, residuals, c)
        torch.testing.assert_close(pooled, shipped, rtol=1e-5, atol=1e-5 * float(shipped.abs().max()))
        assert torch.equal(pooled.argsort(), shipped.argsort())
    with pytest.raises(InvalidInputError, match="forward_pool"):
        model.net.forward_pool(residuals, residuals, c)
    with pytest.raises(InvalidInputError, match="forward_pool"):
        model.net.forward_pool(mean, residuals[:, :10], c)


class _RecordingArcface(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[bool] = []

    def forward(self, blob: torch.Tensor, *, apply_features: bool) -> torch.Tensor:
        self.calls.append(apply_features)
        return blob.reshape(blob.shape[0], -1)[:, :512] * 3.0


class _FakeFarl(nn.Module):
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return image.reshape(image.shape[0], -1)[:, :512] + 7.0


def test_context_is_farl_then_normalised_arcface() -> None:
    with torch.device("meta"):
        model = IdRank(torch.arange(1785))
    arc = _RecordingArcface()
    model.arcface = arc  # stand-ins that make the wiring visible
    model.farl = _FakeFarl()
    g = torch.Generator().manual_seed(7)
    blob, image = torch.randn(1, 3, 112, 112, generator=g), torch.randn(1, 3, 224, 224, generator=g)
    ctx = model.context(blob, image)
    a = blob.reshape(-1)[:512].double() * 3
    expected = torch.cat([image.reshape(-1)[:512].double() + 7, a / a.norm()])
    torch.testing.assert_close(ctx[0].double(), expected, rtol=1e-6, atol=1e-6)
    model.context(blob, image, reproduce_official=True)
    model.context(blob.repeat(2, 1, 1, 1), image.repeat(2, 1, 1, 1), reproduce_official=True)
    assert arc.calls == [True, False, True]  # default applies `features`; official skips it only at batch 1


def test_real_context_is_finite_and_unit_arcface(model: IdRank) -> None:
    g = torch.Generator().manual_seed(8)
    ctx = model.context(torch.randn(1, 3, 112, 112, generator=g), torch.randn(1, 3, 224, 224, generator=g))
    assert ctx.shape == (1, 1024) and torch.isfinite(ctx).all()
    assert abs(float(ctx[0, 512:].norm()) - 1.0) < 1e-5


@pytest.mark.parametrize("shape", [(10, 5023), (0, 5023, 3), (10, 5023, 2), (10, 3000, 3)])
def test_score_rejects_bad_candidates(model: IdRank, shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError):
        model.score(torch.zeros(shape), torch.zeros(1, 1024))


def test_score_rejects_nan_and_bad_context(model: IdRank) -> None:
    v = _candidates(2, 9)
    v[0, 100, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        model.score(v, torch.zeros(1, 1024))
    with pytest.raises(InvalidInputError, match="context"):
        model.score(_candidates(2, 9), torch.zeros(2, 1024))
    with pytest.raises(InvalidInputError, match="farl_image"):
        model.context(torch.zeros(1, 3, 112, 112), torch.zeros(1, 3, 112, 112))


def test_writers_are_reproducible_and_atomic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    write_front_indices(a, "full", torch.Generator().manual_seed(9))
    write_front_indices(b, "full", torch.Generator().manual_seed(9))
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npy"]  # no temp files left
