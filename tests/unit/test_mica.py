"""MICA: strict loading of (synthetic) mica.tar, failures that name the fault, and the forward against numpy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from facefuse.assets.flame_file import load_flame_model
from facefuse.assets.mica_checkpoint import load_mica, validate_mica_checkpoint
from facefuse.errors import AssetError, CheckpointError


@pytest.fixture(scope="module")
def mica_path(synthetic_assets):
    return synthetic_assets.path("mica")


@pytest.fixture(scope="module")
def flame_file_data(synthetic_assets):
    return load_flame_model(
        synthetic_assets.path("flame2020"), landmark_embedding=synthetic_assets.path("landmark_embedding")
    )


@pytest.fixture(scope="module")
def mica(mica_path, flame_file_data):
    return load_mica(mica_path, flame=flame_file_data)


@pytest.fixture(scope="module")
def checkpoint(mica_path):
    return torch.load(mica_path, map_location="cpu", weights_only=True)


def numpy_mapping(state: dict[str, torch.Tensor], z: np.ndarray) -> np.ndarray:
    """§3.1: four Linear + LeakyReLU(0.2) layers, no skips (hidden = 3), then a linear output."""
    h = z
    for i in range(4):
        w = state[f"regressor.network.{i}.weight"].double().numpy()
        b = state[f"regressor.network.{i}.bias"].double().numpy()
        a = h @ w.T + b
        h = np.where(a > 0, a, 0.2 * a)
    return h @ state["regressor.output.weight"].double().numpy().T + state["regressor.output.bias"].double().numpy()


def test_loads_strictly_and_mapping_network_matches_numpy(mica, checkpoint):
    z = np.random.default_rng(0).normal(size=(4, 512))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    with torch.no_grad():
        ours = mica.flameModel.regressor(torch.from_numpy(z).float()).double().numpy()
    expected = numpy_mapping(checkpoint["flameModel"], z)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    loaded = mica.arcface.state_dict()
    for key, value in checkpoint["arcface"].items():
        assert torch.equal(loaded[key], value), key


def test_forward_pipeline_and_batch_independence(mica, checkpoint):
    blob = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    captured = []
    hook = mica.arcface.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
    with torch.no_grad():
        out = mica(blob)
        hook.remove()
        single = mica(blob[:1])
    embedding = captured[0].double().numpy()
    z = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    np.testing.assert_allclose(out.identity.double().numpy(), z, atol=1e-5)
    beta = numpy_mapping(checkpoint["flameModel"], z)
    np.testing.assert_allclose(out.shape.double().numpy(), beta, rtol=1e-4, atol=1e-4)
    flame = checkpoint["flameModel"]
    vertices = flame["generator.v_template"].double().numpy()[None] + np.einsum(
        "vkl,bl->bvk", flame["generator.shapedirs"].double().numpy()[:, :, :300], out.shape.double().numpy())
    np.testing.assert_allclose(out.vertices.double().numpy(), vertices, atol=1e-5)
    assert out.shape.shape == (2, 300) and out.vertices.shape[0] == 2 and out.identity.shape == (2, 512)
    assert out.shape.std() > 0.05 and (out.shape[0] - out.shape[1]).abs().max() > 1e-2
    # ArcFace convs may take different BLAS paths at batch 1 and 2: float tolerance
    torch.testing.assert_close(single.shape, out.shape[:1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single.vertices, out.vertices[:1], rtol=1e-4, atol=1e-6)


def test_validator_describes_the_checkpoint(mica_path):
    assert "925 tensors" in validate_mica_checkpoint(mica_path)


def test_flame_value_disagreement_warns_with_its_size(mica_path, flame_file_data, mica, caplog):
    """Different values still run (as the official code does): warned, sized, and kept in load_report."""
    assert mica.load_report["flame_differences"] == {}
    moved = dataclasses.replace(flame_file_data, v_template=flame_file_data.v_template + 1e-3)
    with caplog.at_level("WARNING", logger="facefuse.assets.mica_checkpoint"):
        warned = load_mica(mica_path, flame=moved)
    assert set(warned.load_report["flame_differences"]) == {"v_template"}
    assert warned.load_report["flame_differences"]["v_template"] == pytest.approx(1e-3, rel=1e-3)
    assert "v_template by up to 0.001" in caplog.text
    blob = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # MICA's own FLAME is the checkpoint's either way: same outputs
        assert torch.equal(warned(blob).vertices, mica(blob).vertices)


def test_flame_topology_disagreement_is_refused(mica_path, flame_file_data):
    fewer = dataclasses.replace(flame_file_data, v_template=flame_file_data.v_template[:-1])
    with pytest.raises(AssetError, match=r"v_template has shape .* cannot be fused"):
        load_mica(mica_path, flame=fewer)


def test_missing_section_is_named(tmp_path, checkpoint):
    path = tmp_path / "mica.tar"
    torch.save({"arcface": checkpoint["arcface"]}, path)
    with pytest.raises(CheckpointError, match="'flameModel'") as info:
        load_mica(path)
    assert str(path) in str(info.value)


def test_renamed_key_and_wrong_shape_are_named(tmp_path, checkpoint):
    renamed = dict(checkpoint["arcface"])
    renamed["layer3.7.conv_1.weight"] = renamed.pop("layer3.7.conv1.weight")
    path = tmp_path / "renamed.tar"
    torch.save({"arcface": renamed, "flameModel": checkpoint["flameModel"]}, path)
    with pytest.raises(CheckpointError, match=r"arcface.*'layer3\.7\.conv1\.weight'.*'layer3\.7\.conv_1\.weight'"):
        load_mica(path)
    del renamed

    reshaped = dict(checkpoint["flameModel"])
    reshaped["regressor.output.weight"] = torch.zeros(300, 299)
    path = tmp_path / "reshaped.tar"
    torch.save({"arcface": checkpoint["arcface"], "flameModel": reshaped}, path)
    with pytest.raises(CheckpointError, match=r"flameModel.*regressor\.output\.weight: shape \(300, "
                                              r"299\), expected \(300, 300\)"):
        load_mica(path)


def test_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "mica.tar"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(AssetError, match=r"mica\.tar"):
        validate_mica_checkpoint(path)
