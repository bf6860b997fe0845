"""IResNet-100: official keys, the official constructor's RNG consumption, and the forward pass against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facefuse.assets.synthetic.mica import arcface_state
from facefuse.models.arcface import IResNet100

LAYERS = ((64, 3), (128, 13), (256, 30), (512, 3))


@pytest.fixture(scope="module")
def arcface() -> IResNet100:
    with torch.device("meta"):  # skip the default initialisation; the weights are assigned below
        model = IResNet100().eval()
    model.load_state_dict(arcface_state(torch.Generator().manual_seed(7)), assign=True)
    return model


def test_state_dict_matches_official_keys_shapes_dtypes_in_order(official_keys):
    expected = official_keys("mica_arcface")
    with torch.device("meta"):
        model = IResNet100()
    got = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert len(expected) == 925
    assert got == expected


def test_constructor_consumes_the_rng_like_the_official_constructor():
    """Replay, from the documented construction order, the draws the official Arcface() makes."""
    torch.manual_seed(1234)
    model = IResNet100()
    state_after_model = torch.get_rng_state()

    torch.manual_seed(1234)
    conv_build_order = [(64, 3, 3, 3)]  # stem
    conv_module_order = [(64, 3, 3, 3)]
    inplanes = 64
    for planes, blocks in LAYERS:
        downsample = (planes, inplanes, 1, 1)
        conv_build_order.append(downsample)  # built before block 0
        for b in range(blocks):
            cin = inplanes if b == 0 else planes
            pair = [(planes, cin, 3, 3), (planes, planes, 3, 3)]
            conv_build_order += pair
            conv_module_order += pair + ([downsample] if b == 0 else [])
        inplanes = planes
    for shape in conv_build_order:  # default Conv2d init: kaiming_uniform_ (one uniform_ draw)
        torch.empty(shape).uniform_()
    torch.empty(512, 25088).uniform_()  # fc weight
    torch.empty(512).uniform_()  # fc bias
    redrawn = [torch.empty(shape).normal_(0.0, 0.1) for shape in conv_module_order]

    assert torch.equal(torch.get_rng_state(), state_after_model)
    model_convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(model_convs) == len(redrawn) == 1 + 49 * 2 + 4
    for ours, theirs in zip(model_convs, redrawn, strict=True):
        assert torch.equal(ours, theirs)
    assert torch.all(model.features.weight == 1.0)


def _np_conv(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    b, _c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((b, o, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
            out += np.einsum("bchw,oc->bohw", patch, w[:, :, i, j])
    return out


def _np_bn(x: np.ndarray, bn: torch.nn.Module) -> np.ndarray:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    p = {
        k: v.detach().double().numpy().reshape(shape) for k, v in bn.state_dict().items() if k != "num_batches_tracked"
    }
    return (x - p["running_mean"]) / np.sqrt(p["running_var"] + 1e-5) * p["weight"] + p["bias"]


def _np_prelu(x: np.ndarray, prelu: torch.nn.Module) -> np.ndarray:
    a = prelu.weight.detach().double().numpy().reshape(1, -1, 1, 1)
    return np.where(x > 0, x, a * x)


def test_first_block_with_downsample_matches_numpy(arcface):
    block = arcface.layer1[0]
    x = torch.randn(2, 64, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = block(x).double().numpy()
    xn = x.double().numpy()
    w = lambda conv: conv.weight.detach().double().numpy()  # noqa: E731
    out = _np_bn(xn, block.bn1)
    out = _np_conv(out, w(block.conv1), 1, 1)
    out = _np_prelu(_np_bn(out, block.bn2), block.prelu)
    out = _np_bn(_np_conv(out, w(block.conv2), 2, 1), block.bn3)
    identity = _np_bn(_np_conv(xn, w(block.downsample[0]), 2, 0), block.downsample[1])
    np.testing.assert_allclose(ours, out + identity, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def forward_outputs(arcface) -> dict[str, torch.Tensor]:
    """One batch-2 forward (with the head's inputs captured) and the same faces one by one."""
    blob = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(2)) * 2 - 1
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        arcface.layer4.register_forward_hook(lambda m, i, o: captured.setdefault("layer4", o.detach().clone())),
        arcface.fc.register_forward_hook(lambda m, i, o: captured.setdefault("fc", o.detach().clone())),
    ]
    with torch.no_grad():
        batch = arcface(blob)
        for h in hooks:
            h.remove()
        singles = torch.cat([arcface(blob[i:i + 1]) for i in range(2)])
        raw_single = arcface(blob[:1], apply_features=False)
    return {"batch": batch, "singles": singles, "raw_single": raw_single, **captured}


def test_head_bn2_fc_features_matches_numpy(arcface, forward_outputs):
    x = forward_outputs["layer4"].double().numpy()
    assert x.shape == (2, 512, 7, 7)
    flat = _np_bn(x, arcface.bn2).reshape(2, -1)  # C-major flatten
    fc = flat @ arcface.fc.weight.detach().double().numpy().T + arcface.fc.bias.detach().double().numpy()
    scale = np.abs(fc).max()
    np.testing.assert_allclose(forward_outputs["fc"].double().numpy(), fc, rtol=1e-4, atol=1e-4 * scale)
    expected = _np_bn(fc, arcface.features)
    np.testing.assert_allclose(forward_outputs["batch"].double().numpy(), expected, rtol=1e-4, atol=1e-4 * scale)


def test_apply_features_false_returns_the_raw_fc_output(forward_outputs):
    raw, fc = forward_outputs["raw_single"], forward_outputs["fc"][:1]
    torch.testing.assert_close(raw, fc, rtol=1e-4, atol=1e-4 * fc.abs().max().item())
    assert (raw - forward_outputs["singles"][:1]).abs().max() > 1e-3  # features BN really skipped


def test_end_to_end_is_finite_varied_and_batch_independent(forward_outputs):
    batch, singles = forward_outputs["batch"], forward_outputs["singles"]
    assert batch.shape == (2, 512) and torch.isfinite(batch).all()
    unit = torch.nn.functional.normalize(batch, dim=1)
    assert (unit[0] @ unit[1]).abs() < 0.95  # different faces -> different identities
    # conv kernels may pick different BLAS paths for batch 1 and 2: float tolerance, not bit equality
    torch.testing.assert_close(singles, batch, rtol=1e-4, atol=1e-4 * batch.abs().max().item())
