"""Hand detector (MediaPipe palm detection + hand landmarks) on synthetic tensors and real photos.

Models come from the model store (the mediapipe 0.10.21 wheel on PyPI, fetched on first use). Photos
are read from installed packages at test time: skimage's astronaut (no hand in it) and insightface's
t1.jpg (a group photo with several hands holding cards and chips). The "hand over a face" image is
made here: a patch of t1 with a real hand pasted over the astronaut's mouth.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from facefuse.errors import AssetError, InvalidInputError
from facefuse.face.facemesh import roi_affine
from facefuse.face.hands import (
    HAND_ROI_SCALE,
    NUM_HAND_LANDMARKS,
    HandDetector,
    HandResult,
    PalmBox,
    decode_palms,
    hand_roi,
    palm_anchors,
)
from facefuse.face.tflite import TFLiteModel
from facefuse.fusion.visibility import visibility_from_hands

# Where the hands are in insightface's t1.jpg (1280 x 886), read off the photo by eye: the card-holding
# hand of the woman on the left, and the chip-holding hand of the man in the red shirt.
T1_CARD_HAND_REGION = (0, 300, 330, 630)
T1_CARD_HAND_BOX = (170, 420, 275, 520)  # x1, y1, x2, y2 in t1 pixels
T1_CHIP_HAND_BOX = (675, 495, 775, 585)
ASTRONAUT_MOUTH = (235, 170)  # x, y: the patch centre, over the lips


@pytest.fixture(scope="session")
def detector(store) -> HandDetector:
    return HandDetector.from_store(store)


@pytest.fixture(scope="session")
def t1() -> np.ndarray:
    spec = importlib.util.find_spec("insightface")
    assert spec is not None and spec.origin, "insightface is a declared dependency"
    path = Path(spec.origin).parent / "data" / "images" / "t1.jpg"
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------- anchors and decoding


def _anchors_from_options() -> np.ndarray:
    """MediaPipe SsdAnchors for palm_detection_full, one layer at a time (num_layers 4, strides 8/16/16/16,
    aspect ratio 1 + interpolated scale, offsets 0.5, fixed size), written as the documented loops."""
    strides = [8, 16, 16, 16]
    out = []
    layer = 0
    while layer < len(strides):
        last = layer
        per_cell = 0
        while last < len(strides) and strides[last] == strides[layer]:
            per_cell += 2
            last += 1
        cells = int(np.ceil(192 / strides[layer]))
        for y in range(cells):
            for x in range(cells):
                for _ in range(per_cell):
                    out.append(((x + 0.5) / cells, (y + 0.5) / cells))
        layer = last
    return np.array(out)


def test_anchor_count_matches_the_palm_model(store):
    anchors = palm_anchors()
    model = TFLiteModel(store.path("palm_detection_full"))
    counts = {tuple(int(v) for v in d["shape"]) for d in model.output_details.values()}
    assert counts == {(1, anchors.shape[0], 18), (1, anchors.shape[0], 1)}
    assert anchors.shape == (24 * 24 * 2 + 12 * 12 * 6, 2)
    np.testing.assert_allclose(anchors, _anchors_from_options(), atol=1e-7)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-x))


def test_decode_one_strong_anchor():
    anchors = palm_anchors()
    # A stride-16 anchor: 1152 stride-8 anchors come first, then 6 per 12 x 12 cell.
    row, col, slot = 5, 7, 3
    index = 1152 + (row * 12 + col) * 6 + slot
    regressors = np.zeros((1, 2016, 18), np.float32)
    logits = np.full((1, 2016, 1), -8.0, np.float32)
    logits[0, index, 0] = 2.5
    raw = np.array([6.0, -3.0, 40.0, 30.0] + [float(v) for v in range(-7, 7)], np.float32)
    regressors[0, index] = raw
    boxes, scores, keypoints = decode_palms(regressors, logits, anchors, 0.5)
    assert boxes.shape == (1, 4) and keypoints.shape == (1, 7, 2)
    ax, ay = (col + 0.5) / 12, (row + 0.5) / 12
    cx, cy, w, h = ax + 6 / 192, ay - 3 / 192, 40 / 192, 30 / 192
    np.testing.assert_allclose(boxes[0], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], atol=1e-6)
    expected_kps = np.arange(-7, 7, dtype=np.float64).reshape(7, 2) / 192 + [ax, ay]
    np.testing.assert_allclose(keypoints[0], expected_kps, atol=1e-6)
    assert scores[0] == pytest.approx(_sigmoid(2.5))


def test_decode_clips_huge_logits_and_respects_the_threshold():
    anchors = palm_anchors()
    logits = np.full((1, 2016, 1), -1e6, np.float32)
    logits[0, 10, 0] = 1e6
    logits[0, 20, 0] = 0.1  # sigmoid 0.525: kept at 0.5, dropped at 0.6
    regressors = np.zeros((1, 2016, 18), np.float32)
    with np.errstate(over="raise"):
        _, scores, _ = decode_palms(regressors, logits, anchors, 0.5)
    np.testing.assert_allclose(np.sort(scores), [_sigmoid(0.1), _sigmoid(100.0)])
    assert decode_palms(regressors, logits, anchors, 0.6)[1].shape == (1,)
    with pytest.raises(InvalidInputError, match="anchors"):
        decode_palms(regressors[:, :100], logits[:, :100], anchors, 0.5)


# --------------------------------------------------------------------------- hand ROI


def test_hand_roi_upright_palm():
    box = np.array([100.0, 200.0, 160.0, 280.0])  # 60 wide, 80 high
    centre, side, angle = hand_roi(box, wrist=np.array([130.0, 270.0]), middle_finger_base=np.array([130.0, 210.0]))
    assert angle == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(centre, [130.0, 240.0 - 0.5 * 80.0])  # moved half the box height up, to the fingers
    assert side == pytest.approx(HAND_ROI_SCALE * 80.0)


def test_hand_roi_rotated_palm_points_the_crop_up_along_the_hand():
    box = np.array([100.0, 200.0, 180.0, 260.0])  # 80 wide, 60 high
    wrist, base = np.array([110.0, 230.0]), np.array([170.0, 230.0])  # fingers point to the image right
    centre, side, angle = hand_roi(box, wrist, base)
    assert angle == pytest.approx(np.pi / 2)
    # MediaPipe's shift: (-h * shift_y * sin r, h * shift_y * cos r) with shift_y = -0.5 and r = 90 degrees.
    np.testing.assert_allclose(centre, [140.0 + 0.5 * 60.0, 230.0], atol=1e-9)
    affine = roi_affine(centre, side, angle, 224)
    top_middle = affine[:, :2] @ [112.0, 0.0] + affine[:, 2]  # the crop's top edge lies towards the fingertips
    np.testing.assert_allclose(top_middle, centre + np.array([side / 2, 0.0]), atol=1e-9)


# --------------------------------------------------------------------------- real photos


def test_no_hand_on_the_astronaut(detector):
    image = skimage.data.astronaut()
    assert detector.detect_palms(image) == []
    assert detector.detect(image) == []


def test_card_hand_found_with_landmarks_on_it(detector, t1):
    region = T1_CARD_HAND_REGION
    hands = detector.detect(t1, region=region)
    assert len(hands) == 1
    hand = hands[0]
    assert isinstance(hand, HandResult)
    assert hand.points.shape == (NUM_HAND_LANDMARKS, 3) and hand.points.dtype == np.float32
    assert hand.score > 0.9 and hand.palm_score > 0.5
    x1, y1, x2, y2 = T1_CARD_HAND_BOX
    assert np.all((hand.points[:, 0] > x1) & (hand.points[:, 0] < x2))
    assert np.all((hand.points[:, 1] > y1) & (hand.points[:, 1] < y2))
    np.testing.assert_allclose(hand.box, [*hand.points[:, :2].min(0), *hand.points[:, :2].max(0)])
    # The same search on the cut-out region gives the same hand, shifted by the region's origin.
    crop = np.ascontiguousarray(t1[region[1]:region[3], region[0]:region[2]])
    palms = detector.detect_palms(crop)
    assert len(palms) == 1
    np.testing.assert_allclose(palms[0].box + [region[0], region[1]] * 2, hand.palm_box, atol=1e-3)


def test_small_hands_in_a_large_photo_need_a_region(detector, t1):
    """The palm model sees 192 x 192 pixels: the card hand (about 90 px of 1280) is only found nearby."""
    found = detector.detect(t1)
    x1, y1, x2, y2 = T1_CARD_HAND_BOX
    assert not any(x1 < h.box[0] and h.box[2] < x2 and y1 < h.box[1] and h.box[3] < y2 for h in found)


def test_mirrored_photo_gives_mirrored_hand_and_flipped_handedness(detector, t1):
    region = T1_CARD_HAND_REGION
    crop = np.ascontiguousarray(t1[region[1]:region[3], region[0]:region[2]])
    mirrored = np.ascontiguousarray(crop[:, ::-1])
    (hand,), (hand_m,) = detector.detect(crop), detector.detect(mirrored)
    width = crop.shape[1]
    back = width - 1 - hand_m.points[:, 0]  # x of the mirrored hand's points, mapped back
    size = float(np.linalg.norm(hand.box[2:] - hand.box[:2]))
    err = np.hypot(back - hand.points[:, 0], hand_m.points[:, 1] - hand.points[:, 1])
    assert np.median(err) < 0.06 * size, err
    assert hand.handedness is not None and hand_m.handedness is not None
    assert abs(hand.handedness - 0.5) > 0.3  # confident on the photo
    assert (hand.handedness > 0.5) != (hand_m.handedness > 0.5)  # and the other hand once mirrored


def _hand_over_face(t1: np.ndarray, hand_box: tuple[int, int, int, int], scale: float) -> tuple[np.ndarray, tuple]:
    x1, y1, x2, y2 = hand_box
    patch = cv2.resize(t1[y1:y2, x1:x2], None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    image = skimage.data.astronaut().copy()
    ph, pw = patch.shape[:2]
    top, left = ASTRONAUT_MOUTH[1] - ph // 2, ASTRONAUT_MOUTH[0] - pw // 2
    image[top:top + ph, left:left + pw] = patch
    return image, (left, top, left + pw, top + ph)


@pytest.fixture(scope="session")
def astronaut_landmarks(store) -> np.ndarray:
    from facefuse.face.frontend import FaceFrontEnd

    faces = FaceFrontEnd.from_assets(None, store).detect(skimage.data.astronaut())
    assert len(faces) == 1
    return faces[0].landmarks


@pytest.mark.parametrize("hand_box,scale", [(T1_CARD_HAND_BOX, 1.3), (T1_CHIP_HAND_BOX, 1.3)])
def test_hand_over_face_feeds_visibility(detector, t1, astronaut_landmarks, hand_box, scale):
    image, pasted = _hand_over_face(t1, hand_box, scale)
    hands = detector.detect(image)
    assert len(hands) == 1
    hand = hands[0]
    px1, py1, px2, py2 = pasted
    assert np.all((hand.points[:, 0] >= px1 - 2) & (hand.points[:, 0] <= px2 + 2))
    assert np.all((hand.points[:, 1] >= py1 - 2) & (hand.points[:, 1] <= py2 + 2))
    visibility = visibility_from_hands(astronaut_landmarks, image.shape, hand_points=[h.points for h in hands])
    assert visibility.sources == ("hands",)
    assert visibility.regions["lips"] < 0.6  # the hand is over the mouth
    assert visibility.regions["forehead"] == 1.0  # and far below the forehead
    assert visibility.regions["right_eye"] == 1.0 and visibility.regions["left_eye"] == 1.0
    # The same points, dropped by a hand's width, cover the lips no more.
    moved = [h.points + np.array([0.0, 200.0, 0.0], np.float32) for h in hands]
    assert visibility_from_hands(astronaut_landmarks, image.shape, hand_points=moved).regions["lips"] == 1.0


# MediaPipe's own answer on the same images: mediapipe 0.10.21 ``solutions.hands.Hands(static_image_mode=True,
# model_complexity=1, max_num_hands=4)`` run once in a throwaway environment (not a project dependency),
# its normalised landmarks times the image width/height, rounded to 0.1 px; 21 (x, y) per image.
MEDIAPIPE_REFERENCE = {
    "card_hand_region": [
        241.1, 208.2, 220.7, 181.6, 213.3, 164.6, 208.7, 153.0, 206.6, 148.0, 242.0, 134.1, 218.4, 134.0, 203.0,
        141.5, 191.9, 148.9, 251.3, 145.2, 218.2, 154.2, 199.0, 162.8, 185.5, 171.2, 255.1, 160.6, 219.9, 170.0,
        200.4, 175.1, 186.0, 181.0, 252.6, 176.6, 224.4, 180.9, 209.3, 182.7, 196.6, 185.5],
    "card_hand_over_face": [
        271.2, 226.2, 241.4, 193.5, 226.5, 170.1, 215.7, 151.9, 207.1, 139.7, 263.8, 126.0, 234.1, 123.8, 212.5,
        133.3, 197.0, 143.6, 275.3, 137.2, 233.4, 148.3, 207.0, 160.3, 187.6, 171.6, 280.2, 156.1, 235.7, 168.8,
        208.9, 176.4, 188.5, 184.4, 278.5, 178.0, 241.4, 185.2, 219.3, 188.1, 200.2, 191.2],
    "chip_hand_over_face": [
        200.9, 198.0, 224.3, 176.0, 246.9, 156.0, 267.7, 148.3, 283.6, 146.5, 231.0, 137.1, 259.6, 126.8, 277.6,
        138.5, 287.1, 150.4, 218.0, 147.7, 260.1, 155.2, 260.4, 170.6, 250.6, 173.9, 209.0, 166.4, 251.8, 171.4,
        252.8, 184.9, 241.7, 187.7, 203.5, 185.7, 240.6, 188.6, 251.4, 197.3, 250.6, 201.3],
}
# Its z (normalised z times the image width, pixels) for the card hand: relative to the wrist, on the x scale.
MEDIAPIPE_REFERENCE_Z = [-0.0, -1.2, -5.9, -11.7, -17.9, -7.6, -16.6, -23.6, -27.4, -12.2, -19.5, -25.6, -30.1, -16.8,
                         -24.5, -28.8, -31.3, -21.3, -26.1, -26.5, -26.1]


@pytest.mark.parametrize("case", sorted(MEDIAPIPE_REFERENCE))
def test_landmarks_agree_with_mediapipe(detector, t1, case):
    if case == "card_hand_region":
        x1, y1, x2, y2 = T1_CARD_HAND_REGION
        image = np.ascontiguousarray(t1[y1:y2, x1:x2])
    else:
        image, _ = _hand_over_face(t1, T1_CARD_HAND_BOX if case.startswith("card") else T1_CHIP_HAND_BOX, 1.3)
    hands = detector.detect(image)
    assert len(hands) == 1
    reference = np.array(MEDIAPIPE_REFERENCE[case]).reshape(NUM_HAND_LANDMARKS, 2)
    diagonal = float(np.linalg.norm(reference.max(0) - reference.min(0)))
    error = np.linalg.norm(hands[0].points[:, :2] - reference, axis=1)
    # Crops are resampled differently (MediaPipe warps; here OpenCV area/bilinear), so not to the pixel.
    assert error.mean() < 0.04 * diagonal and error.max() < 0.2 * diagonal, (error.round(1), diagonal)
    if case == "card_hand_region":
        z_error = np.abs(hands[0].points[:, 2] - np.array(MEDIAPIPE_REFERENCE_Z))
        assert z_error.mean() < 0.04 * diagonal, z_error.round(1)


# --------------------------------------------------------------------------- errors


def test_bad_inputs_are_refused(detector, store):
    with pytest.raises(InvalidInputError, match="uint8 RGB"):
        detector.detect(np.zeros((64, 64), np.uint8))
    with pytest.raises(InvalidInputError, match="uint8 RGB"):
        detector.detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(InvalidInputError, match="region"):
        detector.detect(np.zeros((64, 64, 3), np.uint8), region=(100, 100, 200, 200))
    with pytest.raises(InvalidInputError, match="region"):
        detector.detect(np.zeros((64, 64, 3), np.uint8), region=(0, 0, float("nan"), 10))
    landmark_model = detector.landmark_model
    with pytest.raises(AssetError, match="palm-detection input"):
        HandDetector(landmark_model, landmark_model)
    with pytest.raises(AssetError, match="hand-landmark input"):
        HandDetector(detector.palm_model, detector.palm_model)


def test_max_hands_caps_the_palms(store, t1):
    region = (900, 220, 1280, 700)  # three palms above 0.45 around the woman on the right
    many = HandDetector.from_store(store, score_thresh=0.4, max_hands=4).detect_palms(t1, region=region)
    one = HandDetector.from_store(store, score_thresh=0.4, max_hands=1).detect_palms(t1, region=region)
    assert len(many) >= 2 and len(one) == 1
    assert one[0].score == pytest.approx(max(p.score for p in many))
    assert isinstance(one[0], PalmBox)
