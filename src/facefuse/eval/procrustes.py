"""Similarity Procrustes: the least-squares scale, rotation and translation between point sets.

NoW aligns a prediction to its scan from seven landmark pairs with ``scaling=True,
reflection='best'`` before refining on the surface. 'best' means the orthogonal part is the
unconstrained optimum, which may be a reflection when the landmarks fit better mirrored; ``False``
forces a proper rotation and ``True`` forces a reflection. A fixed scale (the metrical variant) keeps
the optimal orthogonal part, which does not depend on the scale, and the translation optimal for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from facefuse.errors import InvalidInputError


@dataclass(frozen=True)
class SimilarityTransform:
    """x -> scale * rotation @ x + translation (rotation may be a reflection)."""

    scale: float
    rotation: np.ndarray  # (3, 3) orthogonal
    translation: np.ndarray  # (3,)

    def apply(self, points: np.ndarray) -> np.ndarray:
        return self.scale * (np.asarray(points, dtype=np.float64) @ self.rotation.T) + self.translation

    def inverse(self) -> "SimilarityTransform":
        r_inv = self.rotation.T
        return SimilarityTransform(1.0 / self.scale, r_inv, -(r_inv @ self.translation) / self.scale)

    def compose(self, first: "SimilarityTransform") -> "SimilarityTransform":
        """The transform that applies ``first`` and then ``self``."""
        return SimilarityTransform(
            self.scale * first.scale,
            self.rotation @ first.rotation,
            self.scale * (self.rotation @ first.translation) + self.translation,
        )

    @staticmethod
    def identity() -> "SimilarityTransform":
        return SimilarityTransform(1.0, np.eye(3), np.zeros(3))


@dataclass(frozen=True)
class ProcrustesResult:
    transform: SimilarityTransform
    rms: float  # root-mean-square residual of the fitted points, in target units


def similarity_procrustes(
    source: np.ndarray,
    target: np.ndarray,
    *,
    scale: float | None = None,
    reflection: bool | Literal["best"] = "best",
) -> ProcrustesResult:
    """The transform T minimising sum |T(source_i) - target_i|^2.

    ``scale=None`` estimates the scale; a number fixes it. ``reflection`` is 'best', True or False as
    described in the module docstring.
    """
    src = np.asarray(source, dtype=np.float64)
    dst = np.asarray(target, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 3 or src.shape != dst.shape:
        raise InvalidInputError(f"Procrustes needs two (N, 3) arrays of equal shape, got {src.shape} and {dst.shape}")
    if len(src) < 3:
        raise InvalidInputError(f"Procrustes needs at least 3 point pairs, got {len(src)}")
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        raise InvalidInputError("Procrustes points contain NaN or infinite coordinates")
    if reflection not in ("best", True, False):
        raise InvalidInputError(f"reflection must be 'best', True or False, got {reflection!r}")
    mu_s = src.mean(axis=0)
    mu_d = dst.mean(axis=0)
    s0 = src - mu_s
    d0 = dst - mu_d
    var_s = float(np.sum(s0 * s0))
    if var_s <= 0.0:
        raise InvalidInputError("Procrustes source points are all identical; no transform is defined")
    cov = d0.T @ s0  # maximise trace(R^T cov)
    u, sing, vt = np.linalg.svd(cov)
    fix = np.ones(3)
    if reflection != "best":
        has_reflection = np.linalg.det(u @ vt) < 0
        if bool(reflection) != bool(has_reflection):
            fix[-1] = -1.0
    rotation = u @ np.diag(fix) @ vt
    trace = float(np.sum(sing * fix))
    if scale is None:
        fitted_scale = trace / var_s
        if fitted_scale <= 0.0:
            raise InvalidInputError("Procrustes found no positive scale: the point sets are degenerate")
    else:
        fitted_scale = float(scale)
        if not np.isfinite(fitted_scale) or fitted_scale <= 0.0:
            raise InvalidInputError(f"fixed Procrustes scale must be positive, got {scale}")
    translation = mu_d - fitted_scale * (rotation @ mu_s)
    transform = SimilarityTransform(fitted_scale, rotation, translation)
    residual = transform.apply(src) - dst
    return ProcrustesResult(transform, float(np.sqrt(np.mean(np.sum(residual * residual, axis=1)))))
