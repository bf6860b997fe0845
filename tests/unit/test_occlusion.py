"""Occluded variants: deterministic, covering the intended region at the requested coverage."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facefuse.errors import InvalidInputError
from facefuse.eval.occlusion import occlude, occluded_variants

# ArcFace's 112x112 5-point template, scaled x3 and shifted into a 400x360 photo.
KPS = np.array([[38.29, 51.69], [73.53, 51.50], [56.02, 71.74], [41.55, 92.37], [70.73, 92.20]]) * 3 + [40, 20]
BOX = (40.0, 20.0, 376.0, 356.0)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(400, 420, 3), dtype=np.uint8)


def _box_fraction(mask: np.ndarray) -> float:
    x0, y0, x1, y1 = (int(v) for v in BOX)
    return float(mask[y0:y1, x0:x1].sum()) / ((x1 - x0) * (y1 - y0))


def _at(mask: np.ndarray, xy: np.ndarray) -> bool:
    return bool(mask[round(xy[1]), round(xy[0])])


@pytest.mark.parametrize("kind,coverage", [("mask", None), ("eye_band", None), ("hand", 0.25), ("rectangle", 0.3)])
def test_same_seed_same_image_and_only_the_mask_changes(photo: np.ndarray, kind: str, coverage: float | None) -> None:
    a = occlude(photo, BOX, KPS, kind, coverage=coverage, seed=7)
    b = occlude(photo, BOX, KPS, kind, coverage=coverage, seed=7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.image[~a.mask], photo[~a.mask])  # untouched outside the occluder
    assert np.mean(np.any(a.image[a.mask] != photo[a.mask], axis=1)) > 0.95
    assert a.coverage == pytest.approx(_box_fraction(a.mask))
    if kind in ("hand", "rectangle"):
        c = occlude(photo, BOX, KPS, kind, coverage=coverage, seed=8)
        assert not np.array_equal(a.mask, c.mask)


@pytest.mark.parametrize("coverage", [0.05, 0.15, 0.3, 0.5])
def test_rectangle_and_hand_reach_the_requested_coverage(photo: np.ndarray, coverage: float) -> None:
    for seed in range(3):
        rect = occlude(photo, BOX, KPS, "rectangle", coverage=coverage, seed=seed)
        assert _box_fraction(rect.mask) == pytest.approx(coverage, abs=0.01)
        x0, y0, x1, y1 = (int(v) for v in BOX)
        inside = np.zeros_like(rect.mask)
        inside[y0:y1, x0:x1] = True
        assert not np.any(rect.mask & ~inside)  # the rectangle stays within the face box
        hand = occlude(photo, BOX, KPS, "hand", coverage=coverage, seed=seed)
        assert _box_fraction(hand.mask) == pytest.approx(coverage, abs=0.01)


def test_face_mask_covers_nose_and_mouth_not_eyes(photo: np.ndarray) -> None:
    for seed in range(4):
        res = occlude(photo, BOX, KPS, "mask", seed=seed)
        assert _at(res.mask, KPS[2]) and _at(res.mask, KPS[3]) and _at(res.mask, KPS[4])
        assert not _at(res.mask, KPS[0]) and not _at(res.mask, KPS[1])
        # Below the mouth (the chin) is covered too.
        chin = 0.5 * (KPS[3] + KPS[4]) + [0, 0.5 * (KPS[3, 1] - KPS[0, 1])]
        assert _at(res.mask, chin)


def test_face_mask_uses_the_insightface_texture(photo: np.ndarray) -> None:
    spec = importlib.util.find_spec("insightface")
    assert spec is not None and spec.origin is not None
    texture_file = Path(spec.origin).parent / "data" / "images" / "mask_blue.jpg"
    tex = np.asarray(Image.open(texture_file).convert("RGB"), dtype=float)
    h, w = tex.shape[:2]
    inner_mean = tex[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].reshape(-1, 3).mean(axis=0)
    res = occlude(photo, BOX, KPS, "mask", seed=1, texture="blue")
    got = res.image[res.mask].reshape(-1, 3).astype(float).mean(axis=0)
    # The fabric colour (up to the 0.85-1.1 brightness jitter), not the random photo's grey mean.
    ratio = got / inner_mean
    assert np.all(ratio > 0.75) and np.all(ratio < 1.2)
    assert got[2] > got[0] + 40  # blue fabric


def test_eye_band_covers_both_eyes_not_the_mouth(photo: np.ndarray) -> None:
    for seed in range(4):
        res = occlude(photo, BOX, KPS, "eye_band", seed=seed)
        assert _at(res.mask, KPS[0]) and _at(res.mask, KPS[1])
        assert not _at(res.mask, KPS[3]) and not _at(res.mask, KPS[4]) and not _at(res.mask, KPS[2])


def test_rotated_face_moves_the_band_with_the_eyes(photo: np.ndarray) -> None:
    centre = KPS.mean(axis=0)
    a = np.deg2rad(25)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    kps = (KPS - centre) @ rot.T + centre
    res = occlude(photo, BOX, kps, "eye_band", seed=0)
    assert _at(res.mask, kps[0]) and _at(res.mask, kps[1]) and not _at(res.mask, kps[3])


def test_variant_set_is_deterministic_and_complete(photo: np.ndarray) -> None:
    small = photo[::2, ::2].copy()
    kps, box = KPS / 2, tuple(v / 2 for v in BOX)
    first = occluded_variants(small, box, kps, seed=3, coverages=(0.1, 0.2))
    again = occluded_variants(small, box, kps, seed=3, coverages=(0.1, 0.2))
    assert [v.kind for v in first] == ["mask", "eye_band", "hand", "rectangle", "hand", "rectangle"]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(first, again, strict=True))
    more = occluded_variants(small, box, kps, seed=3, coverages=(0.1, 0.2, 0.3))
    assert all(np.array_equal(x.image, y.image) for x, y in zip(first, more, strict=False))  # more extends first


def test_bad_inputs(photo: np.ndarray) -> None:
    with pytest.raises(InvalidInputError, match="kind"):
        occlude(photo, BOX, KPS, "scarf")
    with pytest.raises(InvalidInputError, match="coverage"):
        occlude(photo, BOX, KPS, "rectangle", coverage=1.5)
    with pytest.raises(InvalidInputError, match="coverage"):
        occlude(photo, BOX, KPS, "mask", coverage=0.2)
    with pytest.raises(InvalidInputError, match="key-points"):
        occlude(photo, BOX, KPS[:4], "mask")
    with pytest.raises(InvalidInputError, match="box"):
        occlude(photo, (10, 10, 5, 50), KPS, "eye_band")
    with pytest.raises(InvalidInputError, match="uint8"):
        occlude(photo.astype(np.float32), BOX, KPS, "eye_band")
    with pytest.raises(InvalidInputError, match="texture"):
        occlude(photo, BOX, KPS, "mask", texture="purple")
