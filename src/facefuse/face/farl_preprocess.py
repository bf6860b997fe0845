"""FaRL / CLIP image preprocessing (OpenAI CLIP's ViT-B/16 transform), without torchvision.

Steps, matching torchvision's behaviour on a PIL image:

1. resize so the shorter side is 224 with PIL bicubic; the longer side becomes
   ``int(224 * long / short)`` (truncated); an image whose shorter side is already 224 is untouched;
2. centre crop 224x224 at offsets ``int(round((size - 224) / 2))`` (Python rounding, as torchvision);
3. scale to [0, 1] (divide by 255 in float32), channels first;
4. normalise per channel with the CLIP mean and std, in float32.

Which image: facefuse feeds the 1.6-scale 224x224 face crop, as OFER's own demo does, so steps 1-2 are
no-ops for it. (The seed project, gen_mod, fed the whole uncropped photo instead, which shrinks the
face to a small part of FaRL's input; that departs from OFER's design.)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from facefuse.errors import InvalidInputError

FARL_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(width: int, height: int, size: int = FARL_SIZE) -> tuple[int, int]:
    """(width, height) after a shorter-side resize to ``size`` (torchvision's rule)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def farl_preprocess(image_rgb: np.ndarray) -> np.ndarray:
    """(H,W,3) RGB uint8 image -> (3,224,224) float32, CLIP-normalised, ready for ``encode_image``."""
    if (
        not isinstance(image_rgb, np.ndarray)
        or image_rgb.dtype != np.uint8
        or image_rgb.ndim != 3
        or image_rgb.shape[2] != 3
    ):
        shape = getattr(image_rgb, "shape", None)
        dtype = getattr(image_rgb, "dtype", type(image_rgb).__name__)
        raise InvalidInputError("FaRL preprocessing: expected an (H,W,3) uint8 RGB array, got "
                                f"shape {shape} dtype {dtype}")
    height, width = image_rgb.shape[:2]
    if min(height, width) < 1:
        raise InvalidInputError(f"FaRL preprocessing: empty image of shape {image_rgb.shape}")
    new_w, new_h = resized_size(width, height)
    if (new_w, new_h) != (width, height):
        pil = Image.fromarray(np.ascontiguousarray(image_rgb))
        image_rgb = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BICUBIC))
    top = round((new_h - FARL_SIZE) / 2.0)
    left = round((new_w - FARL_SIZE) / 2.0)
    crop = image_rgb[top:top + FARL_SIZE, left:left + FARL_SIZE]
    chw = crop.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(CLIP_STD, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((chw - mean) / std, dtype=np.float32)
