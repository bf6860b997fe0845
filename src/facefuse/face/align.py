"""Face alignment: the ArcFace 5-point similarity crop, the 1.6-scale box crop, the ArcFace blob.

Facts from the MICA/OFER architecture notes, §1.2-1.4. ``norm_crop`` is insightface's own function
(the official pipelines call it, so the crops are the same pixels); ``estimate_similarity`` is the
package's Umeyama fit (:mod:`facefuse.geometry`), used for everything else and checked against
insightface's matrix in tests.
"""

from __future__ import annotations

import warnings

import numpy as np

from facefuse.geometry import umeyama

ARCFACE_REFERENCE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
"""Reference points of the 112 x 112 ArcFace crop: left eye, right eye, nose tip, left and right
mouth corner (image left/right)."""

BOX_CROP_SIZE = 224
BOX_CROP_SCALE = 1.6


def arcface_reference(size: int = 112) -> np.ndarray:
    """Reference points for an output of ``size`` pixels, scaled as insightface does (§1.2)."""
    if size % 112 == 0:
        ratio, shift_x = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio = size / 128.0
        shift_x = 8.0 * ratio
    else:
        raise ValueError(f"ArcFace crops are defined for multiples of 112 or 128 pixels, not {size}")
    points = ARCFACE_REFERENCE_112 * np.float32(ratio)
    points[:, 0] += np.float32(shift_x)
    return points


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation, never a reflection) mapping the
    (N>=2, 2) points ``src`` onto ``dst``: the (2, 3) matrix [sR | t] in float64 (Umeyama, see
    :mod:`facefuse.geometry`)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two (N>=2, 2) point sets of equal shape, got {src.shape} and {dst.shape}")
    return umeyama(src, dst).matrix()


def arcface_matrix(kps5: np.ndarray, size: int = 112) -> np.ndarray:
    """The (2, 3) image -> crop matrix that puts ``kps5`` on the ArcFace reference points."""
    return estimate_similarity(np.asarray(kps5, dtype=np.float64).reshape(5, 2), arcface_reference(size))


def norm_crop(image: np.ndarray, kps5: np.ndarray, size: int = 112) -> np.ndarray:
    """insightface's ``face_align.norm_crop``: warpAffine, bilinear, black border; dtype kept."""
    from insightface.utils import face_align

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # insightface calls skimage's deprecated estimate()
        return face_align.norm_crop(image, np.asarray(kps5, dtype=np.float32).reshape(5, 2), image_size=size)


def box_crop_points(
    box: np.ndarray, size: int = BOX_CROP_SIZE, scale: float = BOX_CROP_SCALE
) -> tuple[np.ndarray, np.ndarray]:
    """Source and destination points of the §1.4 crop (the correct formula, not gen_mod's ``cy - 1``)."""
    left, top, right, bottom = (float(v) for v in np.asarray(box).reshape(4))
    old_size = ((right - left) + (bottom - top)) / 2.0
    cx, cy = (left + right) / 2.0, (top + bottom) / 2.0
    s = int(scale * old_size)
    if s <= 0:
        raise ValueError(f"box {box} is empty")
    half = s / 2.0
    src = np.array([[cx - half, cy - half], [cx - half, cy + half], [cx + half, cy - half]])
    dst = np.array([[0.0, 0.0], [0.0, size - 1.0], [size - 1.0, 0.0]])
    return src, dst


def box_crop_to_image(box: np.ndarray, size: int = BOX_CROP_SIZE, scale: float = BOX_CROP_SCALE) -> np.ndarray:
    """(2, 3) affine taking a pixel of the box crop to image pixels (the inverse of the crop's warp)."""
    src, dst = box_crop_points(box, size, scale)
    design = np.hstack([dst, np.ones((3, 1))])
    return np.linalg.solve(design, src).T


def box_crop_224(image: np.ndarray, box: np.ndarray, size: int = BOX_CROP_SIZE) -> np.ndarray:
    """The 1.6-scale square crop around a box (§1.4): (size, size, 3) float32 in [0, 1].

    ``image`` is uint8 RGB (divided by 255) or float already in [0, 1]; alpha is dropped. skimage
    ``warp`` with order 1 (bilinear), constant 0 outside the image, clipped; computed in float64.
    """
    from skimage.transform import AffineTransform, warp

    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3]
    src, dst = box_crop_points(box, size)
    # Only the source window (plus a 2-pixel margin for bilinear taps) is converted to float: the
    # same samples as warping the whole image, without converting megapixels that are never read.
    h, w = image.shape[:2]
    x0 = int(np.clip(np.floor(src[:, 0].min()) - 2, 0, w))
    y0 = int(np.clip(np.floor(src[:, 1].min()) - 2, 0, h))
    x1 = int(np.clip(np.ceil(src[:, 0].max()) + 3, 0, w))
    y1 = int(np.clip(np.ceil(src[:, 1].max()) + 3, 0, h))
    if x1 <= x0 or y1 <= y0:  # the box is entirely outside the image
        return np.zeros((size, size, 3), np.float32)
    window = image[y0:y1, x0:x1]
    pixels = window.astype(np.float64) / 255.0 if window.dtype == np.uint8 else window.astype(np.float64)
    matrix = np.vstack([estimate_similarity(src, dst), [0.0, 0.0, 1.0]])
    matrix[:2, 2] += matrix[:2, :2] @ np.array([x0, y0], dtype=np.float64)
    crop = warp(pixels, AffineTransform(matrix=matrix).inverse, output_shape=(size, size), order=1,
                mode="constant", cval=0.0, clip=True)
    return crop.astype(np.float32)


def arcface_blob(crop112: np.ndarray) -> np.ndarray:
    """ArcFace input (3, 112, 112) float32: (p - 127.5) / 127.5 per pixel, channels RGB (§1.3).

    ``crop112`` is an RGB crop, uint8 or float (the NoW path feeds unquantised float pixels).
    """
    crop = np.asarray(crop112)
    if crop.shape != (112, 112, 3):
        raise ValueError(f"expected a (112, 112, 3) RGB crop, got {crop.shape}")
    blob = (crop.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)
    return np.ascontiguousarray(blob.transpose(2, 0, 1))
