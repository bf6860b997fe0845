"""Visibility sources: occluder masks, the photometric skin test, hands, and how they combine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facefuse.errors import InvalidInputError
from facefuse.fusion.visibility import (
    REGION_NAMES,
    Visibility,
    VisibilitySources,
    combine,
    hand_mask_from_points,
    visibility_from_hands,
    visibility_from_mask,
    visibility_photometric,
)

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "visibility_astronaut_landmarks468.npy"
# MediaPipe FaceMesh landmark index facts used to place occluders independently of the region polygons.
MOUTH_CORNERS = (61, 291)
UPPER_LIP_TOP, LOWER_LIP_BOTTOM = 0, 17
NOSE_BRIDGE = 6
CHIN = 152
FACE_SIDES = (234, 454)
BROWS_TOP = (70, 105, 334, 300)
UNDER_EYES = (230, 450)


@pytest.fixture(scope="module")
def astronaut():
    """skimage's astronaut and its 468 landmarks: live from the open front end when its models are
    cached locally, otherwise the fixture derived once with that same front end."""
    import skimage.data

    image = skimage.data.astronaut()
    landmarks = None
    try:
        from facefuse.assets.store import ModelStore
        from facefuse.face.frontend import FaceFrontEnd

        store = ModelStore()
        if store.is_available("face_landmark") and store.is_available("blazeface_full_range"):
            detections = FaceFrontEnd.from_assets(None, store).detect(image)
            if len(detections) == 1:
                landmarks = np.asarray(detections[0].landmarks)
    except Exception:  # any front-end problem falls back to the stored landmarks
        landmarks = None
    if landmarks is None:
        landmarks = np.load(FIXTURE)
    return image, landmarks[:, :2].astype(np.float64)


def _box(lmk: np.ndarray, x_ids, y_top: int | float, y_bottom: int | float, pad: int = 2) -> tuple[int, int, int, int]:
    x0 = int(np.floor(min(lmk[i, 0] for i in x_ids))) - pad
    x1 = int(np.ceil(max(lmk[i, 0] for i in x_ids))) + pad
    return x0, int(np.floor(y_top)) - pad, x1, int(np.ceil(y_bottom)) + pad


def test_mask_over_the_mouth_occludes_the_lips_only(astronaut):
    _, lmk = astronaut
    mask = np.zeros((512, 512), np.uint8)
    x0, y0, x1, y1 = _box(lmk, MOUTH_CORNERS, lmk[UPPER_LIP_TOP, 1], lmk[LOWER_LIP_BOTTOM, 1], pad=3)
    mask[y0:y1, x0:x1] = 255
    vis = visibility_from_mask(mask, lmk)
    assert set(vis.regions) == set(REGION_NAMES) and vis.sources == ("mask",)
    assert vis.regions["lips"] < 0.5
    assert all(vis.regions[r] > 0.5 for r in REGION_NAMES if r != "lips"), vis.regions
    # The same information given as a visible-skin mask.
    flipped = visibility_from_mask(mask == 0, lmk, marks="visible")
    assert flipped.regions == vis.regions


def test_regions_outside_the_frame_are_not_visible(astronaut):
    _, lmk = astronaut
    shifted = lmk.copy()
    shifted[:, 0] -= lmk[NOSE_BRIDGE, 0]  # the face's centre line on the image's left edge
    vis = visibility_from_mask(np.zeros((512, 512), bool), shifted)
    assert vis.regions["right_eye"] < 0.2 and vis.regions["left_eye"] > 0.9


def test_synthetic_photometric_white_mouth_occluder(astronaut):
    _, lmk = astronaut
    rng = np.random.default_rng(0)
    skin = np.clip(np.array([200, 150, 125]) + rng.normal(0, 4, (512, 512, 3)), 0, 255).astype(np.uint8)
    x0, y0, x1, y1 = _box(lmk, MOUTH_CORNERS, lmk[UPPER_LIP_TOP, 1], lmk[LOWER_LIP_BOTTOM, 1], pad=3)
    skin[y0:y1, x0:x1] = 245
    vis = visibility_photometric(skin, lmk)
    assert vis.regions["lips"] < 0.5
    assert all(vis.regions[r] > 0.5 for r in REGION_NAMES if r != "lips"), vis.regions


def _occlude(image: np.ndarray, lmk: np.ndarray, texture: np.ndarray | None, band: bool) -> np.ndarray:
    out = image.copy()
    if texture is not None:  # a face mask from the nose bridge to below the chin, cheek to cheek
        x0, y0, x1, y1 = _box(lmk, FACE_SIDES, lmk[NOSE_BRIDGE, 1], lmk[CHIN, 1], pad=3)
        out[y0:y1, x0:x1] = np.asarray(Image.fromarray(texture).resize((x1 - x0, y1 - y0), Image.BILINEAR))
    if band:  # sunglasses-like dark band from the brows to below the eyes
        x0, y0, x1, y1 = _box(lmk, FACE_SIDES, min(lmk[i, 1] for i in BROWS_TOP), max(lmk[i, 1] for i in UNDER_EYES))
        out[y0:y1, x0:x1] = (22, 20, 24)
    return out


def _mask_textures() -> list[tuple[str, np.ndarray]]:
    import insightface

    folder = Path(insightface.__file__).parent / "data" / "images"
    files = sorted(folder.glob("mask_*.jpg"))
    assert files, f"no mask_*.jpg textures in {folder}"
    return [(f.name, np.asarray(Image.open(f).convert("RGB"))) for f in files]


def test_photometric_on_a_real_photo(astronaut):
    image, lmk = astronaut
    clear = visibility_photometric(image, lmk)
    assert all(v > 0.5 for v in clear.regions.values()), clear.regions
    for name, texture in _mask_textures():
        masked = visibility_photometric(_occlude(image, lmk, texture, band=False), lmk)
        assert masked.regions["lips"] < 0.5 and masked.regions["nose"] < 0.5, (name, masked.regions)
        assert all(masked.regions[r] > 0.5 for r in ("forehead", "left_eye", "right_eye")), (name, masked.regions)
    banded = visibility_photometric(_occlude(image, lmk, None, band=True), lmk)
    assert banded.regions["left_eye"] < 0.5 and banded.regions["right_eye"] < 0.5, banded.regions
    assert all(banded.regions[r] > 0.5 for r in ("lips", "nose")), banded.regions
    name, texture = _mask_textures()[0]
    both = visibility_photometric(_occlude(image, lmk, texture, band=True), lmk)
    assert all(both.regions[r] < 0.5 for r in ("lips", "nose", "left_eye", "right_eye")), both.regions
    assert both.regions["forehead"] > 0.5, both.regions


def test_hands_from_points_and_from_a_mask(astronaut):
    _, lmk = astronaut
    # A "hand" of 21 points spread over the nose and mouth.
    centre = (lmk[1] + lmk[UPPER_LIP_TOP]) / 2
    angles = np.linspace(0, 2 * np.pi, 21, endpoint=False)
    radius = 0.6 * abs(lmk[MOUTH_CORNERS[1], 0] - lmk[MOUTH_CORNERS[0], 0])
    hand = centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    vis = visibility_from_hands(lmk, (512, 512), hand_points=[hand])
    assert vis.sources == ("hands",)
    assert vis.regions["lips"] < 0.5 and vis.regions["nose"] < 0.5
    assert vis.regions["forehead"] > 0.5 and vis.regions["left_eye"] > 0.5
    mask = hand_mask_from_points([hand], (512, 512))
    assert mask[int(centre[1]), int(centre[0])] and not mask[5, 5]
    assert visibility_from_hands(lmk, (512, 512), hand_mask=mask).regions == vis.regions
    assert visibility_from_hands(lmk, (512, 512)).regions == {r: 1.0 for r in REGION_NAMES}
    with pytest.raises(InvalidInputError, match="hand_points"):
        visibility_from_hands(lmk, (512, 512), hand_points=[np.zeros((2, 2))])


def test_combine_takes_the_minimum_per_region():
    a = Visibility({"lips": 0.2, "nose": 0.9}, np.array([1.0, 0.5, 0.2], np.float32), ("mask",))
    b = Visibility({"lips": 0.6, "forehead": 0.4}, np.array([0.3, 0.9, 0.4], np.float32), ("photometric",))
    c = combine(a, None, b)
    assert c.regions == {"lips": 0.2, "nose": 0.9, "forehead": 0.4}
    np.testing.assert_array_equal(c.per_vertex, np.array([0.3, 0.5, 0.2], np.float32))
    assert c.sources == ("mask", "photometric")
    assert c.overall == pytest.approx((0.2 + 0.9 + 0.4) / 3)
    assert combine().regions == Visibility.full().regions


def test_sources_can_be_switched_off(astronaut):
    image, lmk = astronaut
    occluded = _occlude(image, lmk, _mask_textures()[0][1], band=False)
    mask = np.zeros(image.shape[:2], bool)
    mask[: int(lmk[NOSE_BRIDGE, 1])] = True  # claims the upper face is covered
    everything = VisibilitySources().estimate(occluded, lmk, occluder_mask=mask)
    assert everything.regions["lips"] < 0.5 and everything.regions["forehead"] < 0.5
    assert set(everything.sources) == {"mask", "photometric"}
    photometric_only = VisibilitySources(mask=False).estimate(occluded, lmk, occluder_mask=mask)
    assert photometric_only.regions["forehead"] > 0.5 and photometric_only.sources == ("photometric",)
    mask_only = VisibilitySources(photometric=False).estimate(occluded, lmk, occluder_mask=mask)
    assert mask_only.regions["lips"] > 0.5 and mask_only.sources == ("mask",)
    nothing = VisibilitySources(mask=False, photometric=False, hands=False).estimate(occluded, lmk, occluder_mask=mask)
    assert nothing.overall == 1.0


def test_bad_inputs(astronaut):
    image, lmk = astronaut
    with pytest.raises(InvalidInputError, match="landmarks468"):
        visibility_from_mask(np.zeros((10, 10), bool), lmk[:10])
    with pytest.raises(InvalidInputError, match="mask"):
        visibility_from_mask(np.zeros((10, 10, 3)), lmk)
    with pytest.raises(InvalidInputError, match="uint8 RGB"):
        visibility_photometric(image.astype(np.float32), lmk)
