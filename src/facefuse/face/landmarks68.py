"""The iBUG-68 landmarks read off the 468-point MediaPipe FaceMesh (a fact of the two topologies).

FLAME's landmark embedding places the 68 iBUG points on its surface; the front end detects the 468
FaceMesh points. The correspondence below is the commonly used one between the two point sets, in iBUG
order: jaw 0-16 (image-left ear to image-right ear), brows 17-26, nose 27-35, eyes 36-47, mouth 48-67.
It agrees with the 7 NoW points of the open pack (``packs.open.KPT7_INDICES``: iBUG 36, 39, 42, 45, 33,
48, 54 = FaceMesh 33, 133, 362, 263, 2, 61, 291).

The jaw line differs in kind: iBUG's is the silhouette, FaceMesh's points lie on the face surface, so
those 17 points get a lower weight in the fit (``CONTOUR_WEIGHT``).
"""

from __future__ import annotations

import numpy as np

IBUG68_FROM_FACEMESH = (
    162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,  # jaw 0-16
    71, 63, 105, 66, 107, 336, 296, 334, 293, 301,  # brows 17-26
    168, 197, 5, 4, 75, 97, 2, 326, 305,  # nose 27-35
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,  # eyes 36-47
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,  # outer lips 48-59
    78, 82, 13, 312, 308, 317, 14, 87,  # inner lips 60-67
)
CONTOUR = tuple(range(17))
CONTOUR_WEIGHT = 0.5
"""Weight of the jaw-line landmarks relative to the inner-face ones (a surface line vs a silhouette)."""


def ibug68_from_facemesh(landmarks468: np.ndarray) -> np.ndarray:
    """(≥468, D) FaceMesh points -> (68, D) iBUG points (a view of the same values, copied)."""
    points = np.asarray(landmarks468)
    if points.ndim != 2 or points.shape[0] < 468:
        raise ValueError(f"expected (468, D) FaceMesh points, got {points.shape}")
    return points[list(IBUG68_FROM_FACEMESH)].copy()


def ibug68_weights(visibility468: np.ndarray | None) -> np.ndarray:
    """(68,) fit weights: the FaceMesh point's visibility (NaN or None: seen), jaw line × ``CONTOUR_WEIGHT``."""
    weights = np.ones(68)
    if visibility468 is not None:
        vis = np.asarray(visibility468, dtype=np.float64)[list(IBUG68_FROM_FACEMESH)]
        weights = np.where(np.isfinite(vis), np.clip(vis, 0.0, 1.0), 1.0)
    weights[list(CONTOUR)] *= CONTOUR_WEIGHT
    return weights
