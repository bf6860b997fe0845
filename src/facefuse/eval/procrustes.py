"""Similarity Procrustes as NoW uses it: a fit of two 3-D landmark sets and its residual.

NoW aligns a prediction to its scan from seven landmark pairs with ``scaling=True,
reflection='best'`` before refining on the surface. 'best' means the orthogonal part is the
unconstrained optimum, which may be a reflection when the landmarks fit better mirrored; ``False``
forces a proper rotation and ``True`` forces a reflection. A fixed scale (the metrical variant) keeps
the optimal orthogonal part, which does not depend on the scale, and the translation optimal for it.
The solver is the package's one Umeyama fit, :func:`facefuse.geometry.umeyama`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from facefuse.errors import InvalidInputError
from facefuse.geometry import SimilarityTransform, umeyama


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
    """The transform T minimising sum |T(source_i) - target_i|^2 over (N>=3, 3) point pairs.

    ``scale=None`` estimates the scale; a number fixes it. ``reflection`` is 'best', True or False as
    described in the module docstring.
    """
    src = np.asarray(source, dtype=np.float64)
    dst = np.asarray(target, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 3 or src.shape != dst.shape:
        raise InvalidInputError(f"Procrustes needs two (N, 3) arrays of equal shape, got {src.shape} and {dst.shape}")
    if len(src) < 3:
        raise InvalidInputError(f"Procrustes needs at least 3 point pairs, got {len(src)}")
    transform = umeyama(src, dst, scale=scale, reflection=reflection)
    if transform.scale <= 0.0:
        raise InvalidInputError("Procrustes found no positive scale: the point sets are degenerate")
    residual = transform.apply(src) - dst
    return ProcrustesResult(transform, float(np.sqrt(np.mean(np.sum(residual * residual, axis=1)))))
