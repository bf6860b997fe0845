"""Focal lengths of photos, without torch: the gateway (no torch in its image) turns a photo's EXIF focal
into pixels for the fusion service's posed-face fit.

A focal length quoted "35 mm equivalent" is the focal of a lens giving the same field of view on a
36 × 24 mm frame; measured along the diagonal, it is independent of the photo's orientation and aspect:
f_px = f_35 · diag_px / diag_35 with diag_35 = √(36² + 24²) ≈ 43.27 mm.
"""

from __future__ import annotations

import math

FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)
DEFAULT_FOCAL_35MM = 35.0
"""The 35 mm-equivalent focal assumed when the photo has none in its EXIF (a moderate wide angle, between a
phone's main camera (~26 mm) and a portrait lens (~85 mm)). The face's distance scales with it."""


def focal_px_from_35mm(focal_35mm: float, width: int, height: int) -> float:
    """Focal length in pixels of a W×H photo whose lens is ``focal_35mm`` (35 mm equivalent)."""
    if not (math.isfinite(focal_35mm) and focal_35mm > 0 and width > 0 and height > 0):
        raise ValueError(f"focal {focal_35mm} mm on a {width}x{height} photo: expected positive numbers")
    return float(focal_35mm) * math.hypot(width, height) / FULL_FRAME_DIAGONAL_MM
