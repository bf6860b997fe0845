"""Similarity alignment of point sets: one Umeyama solver for the face crops, the open pack and NoW.

It sits at the bottom of the package (numpy and :mod:`facefuse.errors` only) so that ``face/``,
``packs/`` and ``eval/`` share it without importing one another.

Umeyama (1991): with weights w normalised to sum 1, centred point sets x̃, ỹ and Σ = Σ_i w_i ỹ_i x̃_iᵀ =
U S Vᵀ, the orthogonal part is U D Vᵀ, the optimal scale tr(S D) / Σ_i w_i ‖x̃_i‖² and the translation
maps the weighted source mean onto the target's. D = I gives the unconstrained optimum, which is a
reflection when the points fit better mirrored; D flips the last axis to force a proper rotation
(or a reflection). The orthogonal part does not depend on the scale, so a fixed scale keeps it and
takes the translation optimal for that scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from facefuse.errors import InvalidInputError


@dataclass(frozen=True)
class SimilarityTransform:
    """x -> scale * rotation @ x + translation in any dimension (rotation may be a reflection)."""

    scale: float
    rotation: np.ndarray  # (D, D) orthogonal
    translation: np.ndarray  # (D,)

    def apply(self, points: np.ndarray) -> np.ndarray:
        return self.scale * (np.asarray(points, dtype=np.float64) @ self.rotation.T) + self.translation

    def inverse(self) -> SimilarityTransform:
        r_inv = self.rotation.T
        return SimilarityTransform(1.0 / self.scale, r_inv, -(r_inv @ self.translation) / self.scale)

    def compose(self, first: SimilarityTransform) -> SimilarityTransform:
        """The transform that applies ``first`` and then ``self``."""
        return SimilarityTransform(
            self.scale * first.scale,
            self.rotation @ first.rotation,
            self.scale * (self.rotation @ first.translation) + self.translation,
        )

    def matrix(self) -> np.ndarray:
        """The (D, D + 1) affine matrix [sR | t] (what OpenCV and skimage take)."""
        return np.hstack([self.scale * self.rotation, self.translation[:, None]])

    @staticmethod
    def identity(dim: int = 3) -> SimilarityTransform:
        return SimilarityTransform(1.0, np.eye(dim), np.zeros(dim))


def umeyama(
    source: np.ndarray,
    target: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    scale: float | None = None,
    reflection: bool | Literal["best"] = False,
) -> SimilarityTransform:
    """The similarity T minimising Σ_i w_i ‖T(source_i) − target_i‖² for (N, D) point sets.

    ``weights``: (N,) non-negative, not all zero; None weighs every pair equally. ``scale``: None
    estimates it, a positive number fixes it (1.0 is a rigid fit). ``reflection``: False forces a
    proper rotation (det +1), True a reflection (det −1), 'best' takes whichever fits better.
    The estimated scale is 0 (not an error) when no transform of the requested kind does better than
    the target's centroid. Raises :class:`InvalidInputError` for mismatched, non-finite or degenerate
    input (source points identical where weighted).
    """
    src = np.asarray(source, dtype=np.float64)
    dst = np.asarray(target, dtype=np.float64)
    if src.ndim != 2 or src.shape != dst.shape or src.shape[0] < 2 or src.shape[1] < 1:
        raise InvalidInputError("alignment needs two (N>=2, D) point sets of equal shape, got "
                                f"{src.shape} and {dst.shape}")
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        raise InvalidInputError("alignment points contain NaN or infinite coordinates")
    if reflection not in ("best", True, False):
        raise InvalidInputError(f"reflection must be 'best', True or False, got {reflection!r}")
    if weights is None:  # plain sums: the unweighted case computes exactly what NoW's Procrustes did
        src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
        src_c, dst_c = src - src_mean, dst - dst_mean
        cov = dst_c.T @ src_c
        src_var = float(np.sum(src_c * src_c))
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(src),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise InvalidInputError(f"alignment weights must be ({len(src)},), finite, non-negative and not all zero")
        w = w / w.sum()
        src_mean, dst_mean = w @ src, w @ dst
        src_c, dst_c = src - src_mean, dst - dst_mean
        cov = (dst_c * w[:, None]).T @ src_c
        src_var = float(w @ (src_c**2).sum(axis=1))
    if src_var <= 0.0:
        raise InvalidInputError("alignment source points are all identical (where weighted); no transform exists")
    u, singular, vt = np.linalg.svd(cov)
    flip = np.ones(src.shape[1])
    if reflection != "best":
        is_reflection = np.linalg.det(u) * np.linalg.det(vt) < 0
        if bool(reflection) != bool(is_reflection):
            flip[-1] = -1.0
    rotation = (u * flip) @ vt
    if scale is None:
        # tr(S D) >= 0 as S is sorted; 0 when the constrained fit collapses the points onto the target's
        # centroid (a square onto its mirror image with reflection=False). Callers that divide by it check.
        fitted = max(float((singular * flip).sum() / src_var), 0.0)
    else:
        fitted = float(scale)
        if not np.isfinite(fitted) or fitted <= 0.0:
            raise InvalidInputError(f"a fixed alignment scale must be positive and finite, got {scale}")
    return SimilarityTransform(fitted, rotation, dst_mean - fitted * (rotation @ src_mean))
