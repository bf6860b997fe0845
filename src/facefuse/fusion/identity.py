"""One shape per person from several images: a precision-style weighted mean in the linear shape space.

Shape-only FLAME (and the open pack's identity basis) is linear in the shape vector, so the mean of the
meshes is the mesh of the mean shape; averaging vertices and averaging coefficients agree exactly.
Each image counts by its confidence times how much of the face it shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facefuse.errors import InvalidInputError


@dataclass
class IdentityResult:
    shape: np.ndarray | None        # (K,) float32
    vertices_mm: np.ndarray         # (V,3) float32
    vertex_spread_mm: np.ndarray    # (V,) float32
    weights: np.ndarray             # (M,) normalised weights of the members
    kpt7_mm: np.ndarray | None


def image_weight(confidence: float | None, visibility: float | None, floor: float = 1e-3) -> float:
    """confidence × visibility, each defaulting to 1 when unknown, never exactly zero."""
    c = 1.0 if confidence is None else float(confidence)
    v = 1.0 if visibility is None else float(visibility)
    return max(c * v, floor)


def fuse_identity(vertices_mm: np.ndarray, weights: np.ndarray, *, shapes: np.ndarray | None = None,
                  spreads_mm: np.ndarray | None = None, kpt7_mm: np.ndarray | None = None) -> IdentityResult:
    """Weighted mean of M reconstructions of one person; spread = between-image spread ⊕ mean own spread."""
    vertices = np.asarray(vertices_mm, np.float64)
    if vertices.ndim != 3 or vertices.shape[2] != 3 or len(vertices) == 0:
        raise InvalidInputError(f"identity fusion needs (M, V, 3) vertices of one topology, got {vertices.shape}")
    w = np.asarray(weights, np.float64)
    if w.shape != (len(vertices),) or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise InvalidInputError(f"identity fusion: weights must be {len(vertices)} finite "
                                "non-negative values, not all 0")
    w = w / w.sum()
    mean = np.einsum("m,mvk->vk", w, vertices)
    between = np.einsum("m,mv->v", w, ((vertices - mean) ** 2).sum(axis=2))
    own = 0.0 if spreads_mm is None else np.einsum("m,mv->v", w, np.asarray(spreads_mm, np.float64) ** 2)
    shape = None if shapes is None else np.einsum("m,mk->k", w, np.asarray(shapes, np.float64)).astype(np.float32)
    kpt7 = None if kpt7_mm is None else np.einsum("m,mpk->pk", w, np.asarray(kpt7_mm, np.float64)).astype(np.float32)
    return IdentityResult(shape, mean.astype(np.float32), np.sqrt(between + own).astype(np.float32), w, kpt7)
