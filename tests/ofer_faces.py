"""Aligned faces with random image tensors, for tests of the ofer service's calls (not faces of anyone)."""

from __future__ import annotations

import numpy as np

from facefuse.face.types import AlignedFace, Detection


def random_aligned_face(seed: int, farl: bool = True) -> AlignedFace:
    """A face whose ArcFace blob (and FaRL input, with ``farl``) are seeded noise: distinct per seed."""
    rng = np.random.default_rng(seed)
    detection = Detection(box=np.array([0, 0, 100, 100], np.float32), score=1.0, kps5=np.zeros((5, 2), np.float32))
    face = AlignedFace(detection, np.zeros((112, 112, 3), np.uint8), np.zeros((224, 224, 3), np.uint8),
                       np.zeros((224, 224, 3), np.float32), rng.standard_normal((3, 112, 112)).astype(np.float32))
    if farl:
        face.farl_input = rng.standard_normal((3, 224, 224)).astype(np.float32)
    return face
