"""Checkpoints as training code saves them load without full unpickling; anything else is refused.

Trainer extras: numpy arrays and scalars (validator state), optimizer and scheduler state, plain
numbers; file formats: zip and legacy (``_use_new_zipfile_serialization=False``); storage locations:
``cpu`` and ``cuda:0`` (recorded by patching torch's location tagger, so no GPU is needed; the test
checks that the tag really is in the file).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from facefuse.assets.checkpoint_io import NUMPY_SAFE_GLOBALS, TRUST_ENV, load_checkpoint
from facefuse.assets.idgen_checkpoint import load_idgen
from facefuse.assets.mica_checkpoint import load_mica
from facefuse.assets.synthetic.ofer_idgen import idgen_state
from facefuse.errors import CheckpointError
from facefuse.models.diffusion import DDIMSampler


@pytest.fixture(autouse=True)
def _no_trust(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRUST_ENV, raising=False)


def trainer_extras() -> dict[str, Any]:
    """What MICA's / OFER's trainers save beside the weights: optimizer, scheduler, counters, validator."""
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": 7,
        "global_step": np.int64(1234),
        "batch_size": 8,
        "validator": {
            "best_error": np.float64(1.25),
            "errors": np.linspace(0.0, 1.0, 5),
            "per_image": np.arange(12, dtype=np.float32).reshape(3, 4),
            "ids": np.array([3, 1, 2], dtype=np.int32),
            "names": np.array(["a", "b"]),
            "flags": np.array([True, False]),
            "converged": np.bool_(True),
        },
    }


def save(obj: object, path: Path, *, legacy: bool, location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        if location != "cpu":
            patch.setattr(torch.serialization, "location_tag", lambda storage: location)
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


def _assert_same(a: object, b: object) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and b.device.type == "cpu" and torch.equal(a, b)
    elif isinstance(a, (np.ndarray, np.generic)):
        assert type(a) is type(b) and a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


LAYOUTS = [(False, "cpu"), (True, "cpu"), (False, "cuda:0"), (True, "cuda:0")]


@pytest.mark.parametrize(("legacy", "location"), LAYOUTS)
def test_trainer_extras_load_safely(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, legacy: bool,
                                    location: str) -> None:
    payload = {"net": torch.nn.Linear(4, 2).state_dict(), **trainer_extras()}
    path = tmp_path / "ckpt.tar"
    save(payload, path, legacy=legacy, location=location, monkeypatch=monkeypatch)
    if location != "cpu":  # the tag is really in the file: without map_location torch wants that device
        with pytest.raises(RuntimeError, match=r"(?i)cuda"):
            torch.load(path, weights_only=False)
    _assert_same(payload, load_checkpoint(path))


def test_numpy_1x_module_names_are_accepted(tmp_path: Path) -> None:
    """Files written under numpy 1.x name ``numpy.core.multiarray``; the same two functions are allowed."""
    path = tmp_path / "np1.tar"
    torch.save({"validator": {"errors": np.arange(3.0), "best": np.float32(0.5)}}, path,
               _use_new_zipfile_serialization=False)
    blob = path.read_bytes()
    assert b"numpy._core.multiarray" in blob
    path.write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    loaded = load_checkpoint(path)["validator"]
    assert np.array_equal(loaded["errors"], np.arange(3.0)) and loaded["best"] == np.float32(0.5)


class Payload:
    """Stands for any class a checkpoint might name (here one that would run code when unpickled)."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.getenv, ("HOME",))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("where", ["top", "object_array"])
def test_any_other_python_object_is_refused(tmp_path: Path, legacy: bool, where: str) -> None:
    value: object = Payload() if where == "top" else np.array([Payload(), 1], dtype=object)
    path = tmp_path / "bad.tar"
    torch.save({"net": {"w": torch.zeros(2)}, "extra": value}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "getenv" in message and "refused" in message
    assert TRUST_ENV not in message and "weights_only" not in message  # no advice to unpickle fully
    assert "Traceback" not in message and "\n" not in message


def test_allowlist_is_exactly_numpy_reconstruction() -> None:
    assert all(name.startswith("numpy.") for name in NUMPY_SAFE_GLOBALS)
    functions = {name.rsplit(".", 1)[1] for name in NUMPY_SAFE_GLOBALS if not name.startswith("numpy.dtypes.")}
    assert functions == {"ndarray", "dtype", "_reconstruct", "scalar"}
    # and the allowlist is not left behind in torch's process-wide list after a load
    torch.save({"x": np.zeros(1)}, buffer := __import__("io").BytesIO())
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buffer, weights_only=True)


# --- the official files, written with extras, give the same models -----------------------------------
def test_idgen_file_with_trainer_extras_zip_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sections = idgen_state(torch.Generator().manual_seed(0))
    plain, extras = tmp_path / "plain.tar", tmp_path / "extras.tar"
    torch.save(sections, plain)
    save({**sections, **trainer_extras()}, extras, legacy=False, location="cuda:0", monkeypatch=monkeypatch)
    del sections
    reference, loaded = load_idgen(plain), load_idgen(extras)
    mine, theirs = reference.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    context = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(1)), dim=1)
    a = reference.sample(context, 2, DDIMSampler(3), torch.Generator().manual_seed(2))
    b = loaded.sample(context, 2, DDIMSampler(3), torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_mica_file_with_trainer_extras_legacy_cuda(synthetic_assets, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = synthetic_assets.path("mica")
    sections = torch.load(path, map_location="cpu", weights_only=True)
    extras = tmp_path / "mica.tar"
    save({**sections, **trainer_extras()}, extras, legacy=True, location="cuda:0", monkeypatch=monkeypatch)
    reference, loaded = load_mica(path), load_mica(extras)
    blob = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = reference(blob), loaded(blob)
    assert torch.equal(a.vertices, b.vertices) and torch.equal(a.shape, b.shape)


def test_unreadable_farl_file_keeps_the_ofer_backend(synthetic_assets_dir: Path, tmp_path: Path) -> None:
    """model_idrank.tar carries the FaRL weights IdRank uses; a broken optional .pth is reported in Info."""
    from facefuse.assets.registry import asset_path
    from facefuse.packs.loading import load_generative_backend

    farl = asset_path(synthetic_assets_dir, "farl")
    for source in synthetic_assets_dir.rglob("*"):
        if source.is_file():
            target = tmp_path / source.relative_to(synthetic_assets_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            if source == farl:
                target.write_bytes(b"truncated download")
            else:
                target.symlink_to(source)
    backend = load_generative_backend("flame", tmp_path, "cpu")
    assert backend.status.ready, backend.status
    assert "ignored (unreadable" in backend.status.details["farl_file"]
