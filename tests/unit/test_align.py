"""Alignment math against closed-form formulas, skimage and insightface."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
from insightface.utils import face_align
from scipy.ndimage import map_coordinates
from skimage.transform import SimilarityTransform, estimate_transform, warp

from facefuse.face.align import (
    ARCFACE_REFERENCE_112,
    arcface_blob,
    arcface_matrix,
    arcface_reference,
    box_crop_224,
    estimate_similarity,
    norm_crop,
)


def _closed_form_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Linear least squares in (a, b, tx, ty) with x' = a x - b y + tx, y' = b x + a y + ty."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows, float), np.array(rhs, float), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def _random_kps(rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(-0.6, 0.6)
    scale = rng.uniform(0.5, 4.0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (ARCFACE_REFERENCE_112 @ rot.T) * scale + rng.uniform(0, 300, 2) + rng.normal(0, 2.0, (5, 2))


@pytest.mark.parametrize("seed", range(6))
def test_similarity_matches_closed_form_and_skimage(seed):
    rng = np.random.default_rng(seed)
    src = _random_kps(rng)
    dst = ARCFACE_REFERENCE_112.astype(np.float64)
    ours = estimate_similarity(src, dst)
    np.testing.assert_allclose(ours, _closed_form_similarity(src, dst), atol=1e-9)
    tform = SimilarityTransform.from_estimate(src, dst)
    np.testing.assert_allclose(ours, tform.params[:2], atol=1e-9)


def test_similarity_recovers_exact_transform():
    rng = np.random.default_rng(7)
    src = rng.uniform(-50, 50, (8, 2))
    s, theta, t = 1.7, 0.4, np.array([12.0, -3.0])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    dst = s * src @ rot.T + t
    np.testing.assert_allclose(estimate_similarity(src, dst), np.hstack([s * rot, t[:, None]]), atol=1e-10)


def test_similarity_never_reflects():
    src = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mirrored = src * np.array([-1.0, 1.0])
    m = estimate_similarity(src, mirrored)
    assert np.linalg.det(m[:, :2]) >= 0


@pytest.mark.parametrize("size", [112, 224, 128, 256])
def test_reference_points_and_matrix_match_insightface(size):
    rng = np.random.default_rng(size)
    kps = _random_kps(rng).astype(np.float32)
    expected_ref = ARCFACE_REFERENCE_112.astype(np.float64) * (size / 112.0 if size % 112 == 0 else size / 128.0)
    if size % 112 != 0:
        expected_ref[:, 0] += 8.0 * size / 128.0
    np.testing.assert_allclose(arcface_reference(size), expected_ref, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # insightface calls skimage's deprecated estimate()
        official = face_align.estimate_norm(kps, size)
    np.testing.assert_allclose(arcface_matrix(kps, size), official, rtol=1e-6, atol=1e-6)


def test_norm_crop_is_the_warp_of_our_matrix():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (400, 360, 3), dtype=np.uint8)
    kps = _random_kps(rng).astype(np.float32)
    crop = norm_crop(image, kps, 112)
    expected = cv2.warpAffine(image, arcface_matrix(kps, 112), (112, 112), borderValue=0.0)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    assert np.abs(crop.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("box", [[10.3, 20.7, 120.2, 155.9],  # near the corner: part of the crop is outside
                                 [100.6, 110.2, 150.1, 170.8],  # well inside the image
                                 [200.0, 250.0, 330.0, 390.0]])  # hanging over the bottom-right corner
def test_box_crop_matches_official_steps_and_direct_sampling(box):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    box = np.array(box)
    crop = box_crop_224(image, box)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.float32
    # The official steps (§1.4) written out here.
    left, top, right, bottom = box
    old = ((right - left) + (bottom - top)) / 2
    cx, cy = (left + right) / 2, (top + bottom) / 2
    s = int(1.6 * old)
    src = np.array([[cx - s / 2, cy - s / 2], [cx - s / 2, cy + s / 2], [cx + s / 2, cy - s / 2]])
    dst = np.array([[0, 0], [0, 223], [223, 0]])
    tform = estimate_transform("similarity", src, dst)
    official = warp(image / 255.0, tform.inverse, output_shape=(224, 224)).astype(np.float32)
    np.testing.assert_allclose(crop, official, atol=1e-6)
    # Direct bilinear sampling: output (u, v) reads the image at (cx - s/2 + u s/223, cy - s/2 + v s/223).
    v, u = np.mgrid[0:224, 0:224]
    xs, ys = cx - s / 2 + u * s / 223, cy - s / 2 + v * s / 223
    inside = (xs >= 0) & (ys >= 0) & (xs <= 259) & (ys <= 299)
    for c in range(3):
        direct = map_coordinates(image[:, :, c] / 255.0, [ys, xs], order=1, mode="constant", cval=0.0)
        np.testing.assert_allclose(crop[:, :, c][inside], direct[inside], atol=1e-5)
    far_outside = (xs < -1) | (ys < -1) | (xs > 260) | (ys > 300)
    assert np.all(crop[far_outside] == 0.0)  # outside the image is black


def test_arcface_blob_is_gen_mod_rgb_blob():
    rng = np.random.default_rng(3)
    crop = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    blob = arcface_blob(crop)
    assert blob.shape == (3, 112, 112) and blob.dtype == np.float32
    np.testing.assert_allclose(blob, (crop.transpose(2, 0, 1) - 127.5) / 127.5, atol=1e-6)
    # gen_mod: RGB crop -> BGR -> blobFromImages(swapRB=True) gives RGB planes.
    official = cv2.dnn.blobFromImages(
        [crop[:, :, ::-1].copy()], 1.0 / 127.5, (112, 112), (127.5, 127.5, 127.5), swapRB=True
    )
    np.testing.assert_allclose(blob, official[0], atol=1e-6)
