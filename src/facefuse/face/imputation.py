"""FaceMesh completions of a face whose hidden pixels are replaced by noise: the open pack's sampler.

Why: FaceMesh is itself a learned completion model. Under an occluder it still places all 468 points,
but it reads the occluder's edges and flat colour as facial evidence (a grey patch over the mouth
becomes a closed, neutral mouth whose shape depends on the patch's colour). Replacing the hidden
pixels by independent uniform noise removes that false evidence without adding any: each noise draw
gives one completion that depends on the visible pixels, and the spread of the draws is the network's
own uncertainty about what is hidden. It needs no training data, only the FaceMesh model the open
front end already runs, and the randomness is an explicit generator (docs/open-pack.md, measured
there on 21 occluded real faces).

The pixels come from the face's 1.6-scale box crop (``AlignedFace.crop_box224``, which the gateway
sends to every service), so the generative service needs no access to the photo itself.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from facefuse.face.align import box_crop_to_image
from facefuse.face.facemesh import NUM_LANDMARKS, FaceMesh, face_roi, project
from facefuse.face.types import AlignedFace

MASK_DILATION_PX = 2
"""The hidden-pixel mask grows by this many crop pixels, so an occluder's edge along the border of the
hidden triangles is replaced too."""


def image_to_crop(crop_to_image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, ≥2) image pixels -> (N, 2) crop pixels for a (2, 3) crop -> image affine."""
    inverse = cv2.invertAffineTransform(np.asarray(crop_to_image, np.float64))
    return np.asarray(points, np.float64)[:, :2] @ inverse[:, :2].T + inverse[:, 2]


def hidden_pixel_mask(points_px: np.ndarray, triangles: np.ndarray, hidden: np.ndarray, shape: tuple[int, int],
                      dilation_px: int = MASK_DILATION_PX) -> np.ndarray:
    """(H, W) bool: the triangles whose three vertices are all hidden, rasterised at ``points_px`` (V, 2)
    and dilated by ``dilation_px``. A triangle with a visible corner keeps its pixels."""
    hidden = np.asarray(hidden, bool)
    covered = np.asarray(triangles)[hidden[np.asarray(triangles)].all(axis=1)]
    mask = np.zeros(shape, np.uint8)
    if not covered.size:
        return mask.astype(bool)
    polygons = [np.rint(np.asarray(points_px, np.float64)[tri, :2]).astype(np.int32) for tri in covered]
    cv2.fillPoly(mask, polygons, 1)
    if dilation_px > 0:
        return cv2.dilate(mask, np.ones((2 * dilation_px + 1, 2 * dilation_px + 1), np.uint8)).astype(bool)
    return mask.astype(bool)


def noise_imputed_landmarks(mesh: FaceMesh, face: AlignedFace, hidden: np.ndarray, triangles: np.ndarray,
                            num_draws: int, generator: np.random.Generator,
                            stop_check: Callable[[], None] | None = None) -> np.ndarray:
    """(num_draws, 468, 3) FaceMesh points in image pixels (z scaled like x, y), one per noise draw.

    The hidden pixels of ``face.crop_box224`` (the mask of :func:`hidden_pixel_mask` around the face's
    own landmarks) get uniform noise in [0, 255] per pixel and channel, drawn from ``generator``;
    FaceMesh then runs on the ROI the front end uses (1.5 x the detection box, turned upright along the
    eye key-points), located in the crop. ``stop_check`` runs before each draw; its exception ends the work.
    """
    crop_to_image = box_crop_to_image(face.detection.box)
    crop = np.asarray(face.crop_box224, np.float32) * np.float32(255.0)
    landmarks = np.asarray(face.detection.landmarks, np.float64)[:NUM_LANDMARKS]
    mask = hidden_pixel_mask(image_to_crop(crop_to_image, landmarks), triangles, hidden, crop.shape[:2])
    box = image_to_crop(crop_to_image, np.asarray(face.detection.box, np.float64).reshape(2, 2)).reshape(4)
    eyes = image_to_crop(crop_to_image, np.asarray(face.detection.kps5, np.float64)[:2])
    centre, side, angle = face_roi(box, eyes[0], eyes[1])
    count = int(mask.sum())
    draws = np.empty((int(num_draws), NUM_LANDMARKS, 3), np.float64)
    for i in range(int(num_draws)):
        if stop_check is not None:
            stop_check()
        filled = crop.copy()
        filled[mask] = generator.integers(0, 256, size=(count, 3)).astype(np.float32)
        result = mesh.run(filled, centre, side, angle)
        draws[i] = project(result.landmarks, crop_to_image)
    return draws
