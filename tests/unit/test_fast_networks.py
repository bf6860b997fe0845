"""Fast numerics (issue 18): the optimised layers against the shipped ones, on synthetic official-format weights.

Two promises are checked. ``reproduce-official`` runs the shipped layers bit for bit (compared with a copy
whose 1x1 convolutions are plain ``nn.Conv1d``, i.e. the layers before this change). ``fast`` changes the
rounding only; the bounds below are about 10x the deviations measured on these checkpoints:

* IdGen Unet, 1x1 convs as matrix products: max |Δε| ≈ 1e-6 (bound 2e-5) on |ε| ~ 1;
* ArcFace R100 with BatchNorm folded in and channels-last: max |Δ| of the L2-normalised embedding
  ≈ 1e-6 (bound 2e-5);
* bfloat16 / float16 image networks (IdRank's in ``fast`` on an AMX CPU / all on CUDA): cosine(embedding,
  float32) > 0.99 for the networks alone; on an AMX CPU MICA and IdGen stay float32 exactly and IdRank's
  scores move within the bound of ``test_amx_fast_mode_changes_only_the_rank_networks``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facefuse.assets.synthetic.mica import arcface_state
from facefuse.assets.synthetic.ofer_idgen import STRAY_QKV_SUFFIX, idgen_net_state
from facefuse.errors import AssetError
from facefuse.face.types import AlignedFace
from facefuse.models.arcface import IResNet100, fused_for_inference
from facefuse.models.clip_vit import ClipConfig, ClipViT, half_precision_image_tower
from facefuse.models.diffusion import DDIMSampler, OfficialSampler, VarianceSchedule
from facefuse.models.idgen import (
    IdGen,
    IdGenUnet,
    PointwiseConv1d,
    ProjectionAttention,
    SharedFilmEps,
    draw_default_projections,
)
from facefuse.models.idrank import FRONT_VERTEX_COUNT, IdRank
from facefuse.packs import flame as flame_pack
from facefuse.packs.flame import (
    NUMERICS_ENV,
    NUMERICS_MODES,
    MicaBackend,
    NetworkPrecision,
    OferBackend,
    SharedArcFace,
    fast_arcface,
    numerics_mode,
    share_identical_arcface,
    speed_up_ofer,
)

UNET_TOLERANCE = 2e-5
ARCFACE_TOLERANCE = 2e-5
BF16_SCORE_TOLERANCE = 0.03  # measured 0.009 on scores of ~0.85 (IdRank's context in bfloat16)


@pytest.fixture(scope="module")
def unet() -> IdGenUnet:
    state = {k: v for k, v in idgen_net_state(torch.Generator().manual_seed(4)).items()
             if not k.endswith(STRAY_QKV_SUFFIX)}
    with torch.device("meta"):
        net = IdGenUnet()
    net = net.to_empty(device="cpu")
    net.load_state_dict(state, strict=True)  # the official keys and shapes load unchanged
    net.set_projections(draw_default_projections(torch.Generator().manual_seed(0)))
    return net.eval()


def shipped_layout(net: IdGenUnet, *, in_place: bool = False) -> IdGenUnet:
    """``net`` (or a copy) with every PointwiseConv1d made a plain ``nn.Conv1d`` with the same weights (the
    layers before this change)."""
    reference = net if in_place else copy.deepcopy(net)
    for name, module in list(reference.named_modules()):
        if isinstance(module, PointwiseConv1d):
            plain = nn.Conv1d(module.in_channels, module.out_channels, 1, bias=module.bias is not None)
            plain.load_state_dict(module.state_dict())
            parent_name, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent_name) if parent_name else reference, child, plain)
    return reference


def unet_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 300, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = F.normalize(torch.randn(batch, 512, generator=g), dim=1)
    return x, t, context


def test_unet_default_path_is_bit_identical_to_plain_conv1d(unet: IdGenUnet) -> None:
    reference = shipped_layout(unet)
    assert not any(isinstance(m, PointwiseConv1d) for m in reference.modules())
    assert list(reference.state_dict()) == list(unet.state_dict())
    with torch.inference_mode():
        for batch in (1, 10):
            assert torch.equal(unet(*unet_inputs(batch)), reference(*unet_inputs(batch)))


def test_unet_matmul_path_within_tolerance_and_switchable(unet: IdGenUnet) -> None:
    fast = copy.deepcopy(unet).use_matmul(True)
    flags = [m.as_matmul for m in fast.modules() if isinstance(m, (PointwiseConv1d, ProjectionAttention))]
    plain_convs = sum(isinstance(m, nn.Conv1d) for m in shipped_layout(unet).modules())
    assert plain_convs == 35 and len(flags) == plain_convs + 6 and all(flags)  # every 1x1 conv + 6 q/k/v sets
    with torch.inference_mode():
        for batch in (1, 10):
            inputs = unet_inputs(batch)
            exact, quick = unet(*inputs), fast(*inputs)
            deviation = float((exact - quick).abs().max())
            assert 0 <= deviation < UNET_TOLERANCE
            assert float(exact.abs().max()) > 0.1  # the bound is small relative to the output
        back = fast.use_matmul(False)(*unet_inputs(10))
    assert torch.equal(back, unet(*unet_inputs(10)))


def test_pointwise_conv_matmul_on_a_long_signal() -> None:
    conv = PointwiseConv1d(8, 5)
    x = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(1))
    exact = conv(x)
    conv.as_matmul = True
    torch.testing.assert_close(conv(x), exact, rtol=1e-5, atol=1e-6)
    assert conv.weight.shape == (5, 8, 1) and set(conv.state_dict()) == {"weight", "bias"}


def test_unet_precomputed_films_are_the_same_computation(unet: IdGenUnet) -> None:
    """forward(films=films(t, context)) runs exactly the operations of forward(t, context): identical bits."""
    assert len(unet.resnet_blocks()) == 11 and len({id(b) for b in unet.resnet_blocks()}) == 11
    with torch.inference_mode():
        x, t, context = unet_inputs(10)
        assert torch.equal(unet(x, t, context, films=unet.films(t, context)), unet(x, t, context))


class _RecordingFilms:
    """Wraps a Unet's films() to record the row counts it is asked for."""

    def __init__(self, net: IdGenUnet) -> None:
        self.rows: list[int] = []
        self.original = net.films

    def __call__(self, t: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        self.rows.append(int(t.shape[0]))
        return self.original(t, context)


@pytest.mark.parametrize("sampler", [DDIMSampler(num_steps=6), OfficialSampler()], ids=["ddim", "official"])
def test_shared_film_eps_matches_the_plain_eps_model(unet: IdGenUnet, sampler: DDIMSampler | OfficialSampler,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two faces' samples in one batch (3 + 2 rows): the FiLMs are computed once per face and announced step,
    in one batch, and the samples match the plain eps model's to float rounding."""
    idgen = IdGen(nn.Identity(), unet, VarianceSchedule())
    faces = F.normalize(torch.randn(2, 512, generator=torch.Generator().manual_seed(1)), dim=1)
    context = faces[torch.tensor([0, 0, 1, 0, 1])]
    noise = torch.randn(5, 300, generator=torch.Generator().manual_seed(2))
    idgen.shared_films = False
    plain = idgen.sample(context, 5, sampler, initial_noise=noise)
    idgen.shared_films = True
    recording = _RecordingFilms(unet)
    monkeypatch.setattr(unet, "films", recording)
    shared = idgen.sample(context, 5, sampler, initial_noise=noise)
    steps = len(sampler.timesteps())
    assert recording.rows == [2 * steps]  # one batch: 2 faces x every step, nothing computed per step after it
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-4 * float(plain.abs().max()))


def test_shared_film_eps_falls_back_for_mixed_steps_and_unannounced_ones(unet: IdGenUnet) -> None:
    context = F.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(3)), dim=1).expand(4, 512)
    eps = SharedFilmEps(unet, context)
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        mixed = torch.tensor([5, 5, 7, 5])
        assert torch.equal(eps(x, mixed), unet(x, mixed, context))  # no sharing across different steps
        same = torch.full((4,), 9)
        torch.testing.assert_close(eps(x, same), unet(x, same, context), rtol=0, atol=1e-4)  # not announced


@pytest.fixture(scope="module")
def arcface() -> IResNet100:
    model = IResNet100()
    model.load_state_dict(arcface_state(torch.Generator().manual_seed(2)), strict=True)
    return model.eval()


def arcface_blob(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(10 + batch))


def test_fused_arcface_within_tolerance_and_leaves_the_original_alone(arcface: IResNet100) -> None:
    before = {k: v.clone() for k, v in arcface.state_dict().items()}
    fused = fused_for_inference(arcface)
    assert {k: v for k, v in arcface.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in arcface.state_dict().items())
    assert not any(isinstance(m, nn.BatchNorm2d) and name.endswith(("bn2", "bn3")) for name, m in fused.named_modules()
                   if name.startswith("layer"))
    assert fused.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for batch, features in ((1, True), (3, True), (2, False)):
            blob = arcface_blob(batch)
            exact = F.normalize(arcface(blob, apply_features=features), dim=1)
            quick = F.normalize(fused(blob, apply_features=features), dim=1)
            assert quick.dtype == torch.float32
            assert float((exact - quick).abs().max()) < ARCFACE_TOLERANCE


def test_fused_arcface_refuses_training_mode(arcface: IResNet100) -> None:
    with pytest.raises(ValueError, match="eval"):
        fused_for_inference(copy.deepcopy(arcface).train())


def test_low_precision_dtype_plumbing_on_cpu(arcface: IResNet100) -> None:
    """bfloat16 on the CPU exercises the cast-in / float32-out path the float16 GPU mode takes."""
    half = fused_for_inference(arcface, dtype=torch.bfloat16)
    assert half.conv1.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        blob = arcface_blob(2)
        exact, quick = arcface(blob), half(blob)
    assert quick.dtype == torch.float32
    assert float(F.cosine_similarity(exact, quick).min()) > 0.99


def test_half_precision_image_tower_keeps_layernorms_float32() -> None:
    torch.manual_seed(0)
    config = ClipConfig(vision_layers=2, text_layers=1, vocab_size=16)
    model = ClipViT(config).eval()
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        exact = model.encode_image(image)
        half_precision_image_tower(model, torch.bfloat16)
        quick = model.encode_image(image)
    assert model.dtype == torch.bfloat16 and model.visual.ln_pre.weight.dtype == torch.float32
    assert quick.dtype == torch.float32
    assert float(F.cosine_similarity(exact, quick).min()) > 0.99


def test_numerics_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NUMERICS_ENV, raising=False)
    assert numerics_mode() == "fast" and numerics_mode("default") == "fast"
    assert numerics_mode("reproduce-official") == "reproduce-official"
    monkeypatch.setenv(NUMERICS_ENV, "reproduce-official")
    assert numerics_mode("default") == "reproduce-official"
    monkeypatch.setenv(NUMERICS_ENV, "fast-float32")
    assert numerics_mode() == "fast-float32" and numerics_mode("reproduce-official") == "reproduce-official"
    monkeypatch.setenv(NUMERICS_ENV, "turbo")
    with pytest.raises(AssetError, match="FACEFUSE_NUMERICS"):
        numerics_mode()


def _sample(backend: OferBackend) -> np.ndarray:
    """Sampling reads only the face's ArcFace blob; a fixed random blob stands in for a detected face."""
    blob = torch.randn(3, 112, 112, generator=torch.Generator().manual_seed(8)).numpy()
    face = cast(AlignedFace, SimpleNamespace(arcface_blob=blob))
    return backend.sample(face, 3, mode="fast", steps=4, seed=5, start_shape=None, start_t0=0,
                          guide_shape=None, guide_strength=0.0)


@pytest.fixture
def float32_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This host as a CPU without bfloat16 matrix units: ``fast`` runs everything in float32."""
    monkeypatch.setattr(flame_pack, "cpu_has_bfloat16_matrix_units", lambda: False)


@pytest.fixture
def amx_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This host as an AMX CPU: ``fast`` runs ArcFace and FaRL in bfloat16 (works, slowly, on any CPU)."""
    monkeypatch.setattr(flame_pack, "cpu_has_bfloat16_matrix_units", lambda: True)


@pytest.mark.usefixtures("float32_cpu")
def test_ofer_backend_reproduce_official_runs_the_shipped_layers_bit_for_bit(
    synthetic_assets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(NUMERICS_ENV, "reproduce-official")
    exact = OferBackend.from_assets(synthetic_assets_dir, "cpu")
    assert exact.status.details["numerics"] == "reproduce-official"
    assert exact.status.details["image_networks"] == "float32"
    assert not any(getattr(m, "as_matmul", False) for m in exact.idgen.modules())
    assert isinstance(exact.idgen.arcface.layer1[0].bn2, nn.BatchNorm2d)
    assert not exact.idrank.pool_scoring and not exact.idgen.shared_films
    exact_samples = _sample(exact)
    exact_scores = _rank_scores(exact, exact_samples)
    # The same sampling through the layers as they were before (plain nn.Conv1d): identical bits.
    shipped_layout(exact.idgen.net, in_place=True)  # (a backend's hooked modules cannot be deep-copied)
    np.testing.assert_array_equal(_sample(exact), exact_samples)

    for mode in ("fast", "fast-float32"):  # the same on a CPU without AMX
        monkeypatch.setenv(NUMERICS_ENV, mode)
        fast = OferBackend.from_assets(synthetic_assets_dir, "cpu")
        assert fast.status.details["numerics"] == mode and fast.status.details["image_networks"] == "float32"
        assert fast.idrank.pool_scoring and fast.idgen.shared_films
        np.testing.assert_allclose(_sample(fast), exact_samples, rtol=0, atol=1e-3)
        # IdRank's scores of the same candidates: float32 rounding only (folded ArcFace, pool scoring).
        np.testing.assert_allclose(_rank_scores(fast, exact_samples), exact_scores, rtol=0, atol=1e-4)


def test_network_precision_per_mode_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """float16 on CUDA, bfloat16 for IdRank's networks only on an AMX CPU, float32 elsewhere and in the other
    modes (no GPU needed: only the choice is checked here)."""
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    for amx in (True, False):
        monkeypatch.setattr(flame_pack, "cpu_has_bfloat16_matrix_units", lambda amx=amx: amx)
        assert NetworkPrecision.choose("fast", "cuda") == NetworkPrecision(f16, f16)
        assert NetworkPrecision.choose("fast", "cuda:1") == NetworkPrecision(f16, f16)
        assert NetworkPrecision.choose("fast", "cpu") == NetworkPrecision(f32, bf16 if amx else f32)
        for mode in ("fast-float32", "reproduce-official"):
            assert NetworkPrecision.choose(mode, "cuda") == NetworkPrecision(f32, f32)
            assert NetworkPrecision.choose(mode, "cpu") == NetworkPrecision(f32, f32)
    assert NetworkPrecision(f32, bf16).describe() == "shape float32, rank bfloat16"
    assert NetworkPrecision(f16, f16).describe() == "float16"


def test_a_shared_arcface_keeps_the_shape_precision(arcface: IResNet100) -> None:
    """IdRank's networks in bfloat16 (``fast`` on AMX): an ArcFace that IdGen and IdRank share stays in the
    shape precision (float32), since IdGen's samples are computed from it; FaRL still goes to bfloat16."""
    idgen = IdGen(copy.deepcopy(arcface), IdGenUnet(), VarianceSchedule())
    idrank = IdRank(torch.arange(FRONT_VERTEX_COUNT))
    idrank.arcface.load_state_dict(arcface.state_dict())
    assert share_identical_arcface(idgen, idrank).startswith("yes")
    speed_up_ofer(idgen, idrank, NetworkPrecision(torch.float32, torch.bfloat16))
    assert idgen.arcface is idrank.arcface and isinstance(idgen.arcface, SharedArcFace)
    assert idgen.arcface.arcface.conv1.weight.dtype == torch.float32
    assert idrank.farl.dtype == torch.bfloat16 and idgen.shared_films and idrank.pool_scoring


def test_amx_probe_answers_a_bool() -> None:
    assert isinstance(flame_pack.cpu_has_bfloat16_matrix_units(), bool)


def test_fast_arcface_casts_to_the_chosen_dtype(arcface: IResNet100) -> None:
    assert fast_arcface(arcface, torch.float16).conv1.weight.dtype == torch.float16
    assert fast_arcface(arcface, torch.bfloat16).fc.weight.dtype == torch.bfloat16
    assert fast_arcface(arcface).conv1.weight.dtype == torch.float32
    with pytest.raises(TypeError, match="IResNet100"):
        fast_arcface(nn.Linear(2, 2))


@pytest.mark.usefixtures("float32_cpu")
def test_mica_backend_follows_the_numerics_mode(synthetic_assets_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blob = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(12))
    results = {}
    for mode in NUMERICS_MODES:
        monkeypatch.setenv(NUMERICS_ENV, mode)
        backend = MicaBackend.from_assets(synthetic_assets_dir, "cpu")
        assert backend.status.details["numerics"] == mode
        assert backend.status.details["image_networks"] == "float32"
        folded = isinstance(backend.mica.arcface.bn1, nn.Identity)
        assert folded == (mode != "reproduce-official")
        with torch.inference_mode():
            results[mode] = backend.mica(blob).shape
    torch.testing.assert_close(results["fast"], results["reproduce-official"], rtol=0, atol=1e-4)
    torch.testing.assert_close(results["fast-float32"], results["fast"], rtol=0, atol=0)


def _rank_scores(backend: OferBackend, candidates: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(9)
    blob = rng.standard_normal((3, 112, 112)).astype(np.float32)
    face = cast(AlignedFace, SimpleNamespace(arcface_blob=blob, farl_input=rng.standard_normal((3, 224, 224)).astype(
        np.float32)))
    return backend.rank(face, candidates)


@pytest.mark.usefixtures("amx_cpu")
def test_amx_fast_mode_changes_only_the_rank_networks(
    synthetic_assets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fast`` on an AMX CPU against ``fast-float32``: MICA's shapes and IdGen's samples are bit for bit the
    same (their networks stay float32); IdRank's scores move by bfloat16 rounding of its context only."""
    blob = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(12))
    shapes, samples, scores, backends = {}, {}, {}, {}
    for mode in ("fast-float32", "fast"):
        monkeypatch.setenv(NUMERICS_ENV, mode)
        mica = MicaBackend.from_assets(synthetic_assets_dir, "cpu")
        backends[mode] = ofer = OferBackend.from_assets(synthetic_assets_dir, "cpu")
        assert mica.status.details["image_networks"] == "float32"
        expected = "shape float32, rank bfloat16" if mode == "fast" else "float32"
        assert ofer.status.details["image_networks"] == expected
        with torch.inference_mode():
            shapes[mode] = mica.mica(blob).shape
        samples[mode] = _sample(ofer)
        scores[mode] = _rank_scores(ofer, samples[mode])
    fast = backends["fast"]
    assert fast.idrank.farl.dtype == torch.bfloat16 and fast.idrank.arcface.conv1.weight.dtype == torch.bfloat16
    assert fast.idgen.arcface.conv1.weight.dtype == torch.float32
    assert fast.idgen.net.time_mlp[1].weight.dtype == torch.float32  # the sampler stays float32
    torch.testing.assert_close(shapes["fast"], shapes["fast-float32"], rtol=0, atol=0)
    np.testing.assert_array_equal(samples["fast"], samples["fast-float32"])
    np.testing.assert_allclose(scores["fast"], scores["fast-float32"], rtol=0, atol=BF16_SCORE_TOLERANCE)
