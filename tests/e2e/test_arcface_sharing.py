"""ArcFace shared between IdGen and IdRank only when their weights are identical (issue 18 item 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facefuse.face.types import AlignedFace, Detection
from facefuse.packs.flame import NUMERICS_ENV, OferBackend, SharedArcFace, share_identical_arcface


def _face() -> AlignedFace:
    rng = np.random.default_rng(4)
    detection = Detection(box=np.array([0, 0, 100, 100], np.float32), score=1.0, kps5=np.zeros((5, 2), np.float32))
    return AlignedFace(detection, np.zeros((112, 112, 3), np.uint8), np.zeros((224, 224, 3), np.uint8),
                       np.zeros((224, 224, 3), np.float32), rng.standard_normal((3, 112, 112)).astype(np.float32),
                       farl_input=rng.standard_normal((3, 224, 224)).astype(np.float32))


def _sample_and_rank(backend: OferBackend, face: AlignedFace) -> tuple[np.ndarray, np.ndarray]:
    samples = backend.sample(face, 3, mode="fast", steps=4, seed=2, start_shape=None, start_t0=0, guide_shape=None,
                             guide_strength=0.0)
    return samples, backend.rank(face, samples)


def test_different_weights_share_nothing_identical_weights_share_one_exact_pass(
    synthetic_assets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # float32 throughout, so that copying IdGen's ArcFace weights into IdRank's gives identical tensors (in
    # ``fast`` on an AMX CPU IdRank's copy is bfloat16; the loader compares the shipped float32 weights).
    monkeypatch.setenv(NUMERICS_ENV, "fast-float32")
    backend = OferBackend.from_assets(synthetic_assets_dir, "cpu")
    # The synthetic files, like the official ones, carry different IdGen and IdRank ArcFace weights.
    assert backend.status.details["arcface_shared"].startswith("no")
    assert backend.idgen.arcface is not backend.idrank.arcface
    # Give IdRank IdGen's ArcFace weights: the two passes now compute the same numbers.
    backend.idrank.arcface.load_state_dict(backend.idgen.arcface.state_dict())
    face = _face()
    separate = _sample_and_rank(backend, face)
    assert share_identical_arcface(backend.idgen, backend.idrank).startswith("yes")
    shared = backend.idgen.arcface
    assert isinstance(shared, SharedArcFace) and backend.idrank.arcface is shared
    together = _sample_and_rank(backend, face)
    assert shared.passes == 1  # the Rank call reused the Sample call's pass
    for a, b in zip(separate, together, strict=True):
        assert np.array_equal(a, b)
    other = _face()
    other.arcface_blob = other.arcface_blob[::-1].copy()
    _sample_and_rank(backend, other)
    assert shared.passes == 2  # another face: its own pass
