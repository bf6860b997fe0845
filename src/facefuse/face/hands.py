"""Hands in a photo (MediaPipe palm detector + 21-point hand landmarks, Apache-2.0), for hand occlusion.

A hand over the face hides part of it, and fusion must know which part: the 21 landmarks of each hand
feed ``facefuse.fusion.visibility.visibility_from_hands``. Two stages, as in MediaPipe's hand graphs:

Palm detection (``palm_detection_full``; palm_detection_cpu graph facts):
* input 192 x 192 RGB, float in [0, 1], the image letterboxed (aspect ratio kept, centred, zero border);
* SSD anchors: 4 layers with strides 8, 16, 16, 16, aspect ratio 1 plus the interpolated-scale anchor
  (2 anchors per cell and layer), fixed anchor size 1, offsets 0.5. Layers of equal stride share one
  grid: 24 x 24 cells x 2 + 12 x 12 cells x 6 = 2016 anchors, cell-major (row, column, then anchor);
* regressors (2016, 18) in input pixels: box centre x, y and width, height (x first), then 7 key-points
  (x, y) as offsets from the anchor centre; all divided by 192;
* classificator logits (2016, 1): score = sigmoid(clip(logit, -100, 100)), kept when >= 0.5;
* weighted non-maximum suppression, IoU threshold 0.3.
Palm key-points used here: 0 the wrist centre, 2 the middle-finger base (MCP); the other five lie on
the other finger bases and the thumb.

Hand ROI from a palm (palm_detection_detection_to_roi graph facts): rotated so that the line from the
wrist (key-point 0) to the middle-finger base (key-point 2) points up in the crop; the centre moves by
-0.5 x the palm box height along the crop's y axis (towards the fingers); a square of 2.6 x the longer
side of the palm box; border pixels replicated.

Hand landmarks (``hand_landmark_full``; hand_landmark_cpu graph facts):
* input 224 x 224 RGB in [0, 1];
* outputs, in the model's order: 21 x (x, y, z) landmarks in crop pixels; hand presence (a probability);
  handedness (a probability, MediaPipe label "Left"); 21 x 3 world landmarks (metres, unused here);
* a hand counts as present when the presence is >= 0.5; z is normalised by 0.4 on top of the x/y scale
  ("normalize_z") before it is projected, so z is on the scale of x.
Handedness: MediaPipe labels hands as if the image were mirrored (a selfie view), so for an ordinary,
non-mirrored photo its "Left" probability is the probability that the hand is the subject's RIGHT hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from facefuse.errors import AssetError, InvalidInputError
from facefuse.face.blazeface import SCORE_CLIP, anchor_centres, letterbox, weighted_nms
from facefuse.face.facemesh import crop_roi, project, roi_affine
from facefuse.face.tflite import TFLiteModel
from facefuse.io.images import require_rgb_uint8

if TYPE_CHECKING:
    from facefuse.assets.store import ModelStore

PALM_INPUT = 192
PALM_STRIDES = (8, 16, 16, 16)
ANCHORS_PER_LAYER = 2  # aspect ratio 1.0 and the interpolated-scale anchor
PALM_NUM_KEYPOINTS = 7
PALM_NUM_COORDS = 4 + 2 * PALM_NUM_KEYPOINTS
PALM_NMS_IOU = 0.3
WRIST = 0  # palm key-point indices
MIDDLE_FINGER_BASE = 2

HAND_ROI_SCALE = 2.6
HAND_ROI_SHIFT_Y = -0.5
LANDMARK_INPUT = 224
NUM_HAND_LANDMARKS = 21
LANDMARK_Z_NORMALISER = 0.4
DEFAULT_SCORE_THRESH = 0.5
DEFAULT_PRESENCE_THRESH = 0.5
DUPLICATE_IOU = 0.5  # two results whose landmark boxes overlap more than this are one hand


@dataclass
class HandResult:
    """One hand in image pixels (x right, y down).

    ``points``: float32 (21, 3), MediaPipe hand topology (0 wrist, 4 thumb tip, 8 index tip, 12 middle
    tip, 16 ring tip, 20 little-finger tip); z is a relative depth on the x/y pixel scale (smaller =
    closer to the camera). ``score``: hand presence in [0, 1]. ``handedness``: probability that this is
    the subject's right hand in a non-mirrored photo (None when the model gives none). ``box``: float32
    (4,) x1, y1, x2, y2 around the 21 points. ``palm_box``/``palm_score``/``palm_keypoints``: the palm
    detection it came from; ``crop_to_image``: the (2, 3) affine of the 224 x 224 landmark crop.
    """

    points: np.ndarray
    score: float
    handedness: float | None
    box: np.ndarray
    palm_score: float = 0.0
    palm_box: np.ndarray = field(default_factory=lambda: np.zeros(4, np.float32))
    palm_keypoints: np.ndarray = field(default_factory=lambda: np.zeros((PALM_NUM_KEYPOINTS, 2), np.float32))
    crop_to_image: np.ndarray = field(default_factory=lambda: np.zeros((2, 3), np.float64))


@dataclass
class PalmBox:
    """A palm detection in image pixels: box x1, y1, x2, y2, score, 7 key-points (7, 2)."""

    box: np.ndarray
    score: float
    keypoints: np.ndarray


def palm_anchors(input_size: int = PALM_INPUT, strides: tuple[int, ...] = PALM_STRIDES,
                 anchors_per_layer: int = ANCHORS_PER_LAYER) -> np.ndarray:
    """(2016, 2) normalised anchor centres x, y in the order of the palm model's outputs."""
    groups: list[np.ndarray] = []
    k = 0
    while k < len(strides):
        # Consecutive layers with the same stride put all their anchors in one cell-major grid.
        same = 1
        while k + same < len(strides) and strides[k + same] == strides[k]:
            same += 1
        groups.append(np.repeat(anchor_centres(input_size, strides[k]), anchors_per_layer * same, axis=0))
        k += same
    return np.concatenate(groups, axis=0)


def decode_palms(regressors: np.ndarray, logits: np.ndarray, anchors: np.ndarray, score_thresh: float,
                 input_size: int = PALM_INPUT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw tensors -> (boxes (K, 4) xyxy, scores (K,), key-points (K, 7, 2)), normalised to the input."""
    raw = regressors.reshape(-1, PALM_NUM_COORDS).astype(np.float64) / input_size
    logits = logits.reshape(-1).astype(np.float64)
    if raw.shape[0] != anchors.shape[0] or logits.shape[0] != anchors.shape[0]:
        raise InvalidInputError(
            f"palm outputs: {raw.shape[0]} boxes and {logits.shape[0]} scores for {anchors.shape[0]} anchors")
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -SCORE_CLIP, SCORE_CLIP)))
    keep = scores >= score_thresh
    raw, scores, centres = raw[keep], scores[keep], anchors[keep].astype(np.float64)
    cx, cy = raw[:, 0] + centres[:, 0], raw[:, 1] + centres[:, 1]
    half_w, half_h = raw[:, 2] / 2.0, raw[:, 3] / 2.0
    boxes = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)
    keypoints = raw[:, 4:].reshape(-1, PALM_NUM_KEYPOINTS, 2) + centres[:, None, :]
    return boxes, scores, keypoints


def hand_roi(palm_box: np.ndarray, wrist: np.ndarray, middle_finger_base: np.ndarray
             ) -> tuple[np.ndarray, float, float]:
    """Centre, side and angle (``roi_affine``'s convention) of the landmark crop for one palm, in pixels."""
    box = np.asarray(palm_box, np.float64)
    d = np.asarray(middle_finger_base, np.float64) - np.asarray(wrist, np.float64)
    # Crop "up" (0, -1) must land on the wrist -> middle-finger direction: R(a) @ (0, -1) = (sin a, -cos a).
    angle = float(np.arctan2(d[0], -d[1]))
    width, height = box[2] - box[0], box[3] - box[1]
    c, s = np.cos(angle), np.sin(angle)
    shift = HAND_ROI_SHIFT_Y * height * np.array([-s, c])  # (0, shift_y * height) rotated by the angle
    centre = np.array([(box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0]) + shift
    return centre, float(max(width, height) * HAND_ROI_SCALE), angle


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _check_image(image_rgb: np.ndarray) -> np.ndarray:
    return require_rgb_uint8(image_rgb, "hand detection")


def _region_bounds(region: Sequence[float] | np.ndarray, image_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Integer x1, y1, x2, y2 of ``region`` clipped to the image; an empty or non-finite region is refused."""
    try:
        values = np.asarray(region, np.float64).reshape(-1)
    except (TypeError, ValueError):
        values = np.full(0, np.nan)
    if values.shape != (4,) or not np.all(np.isfinite(values)):
        raise InvalidInputError(f"hand detection region: expected 4 finite numbers x1, y1, x2, y2, got {region!r}")
    height, width = image_shape[:2]
    x1, y1 = int(np.clip(np.floor(values[0]), 0, width)), int(np.clip(np.floor(values[1]), 0, height))
    x2, y2 = int(np.clip(np.ceil(values[2]), 0, width)), int(np.clip(np.ceil(values[3]), 0, height))
    if x2 - x1 < 8 or y2 - y1 < 8:
        raise InvalidInputError(f"hand detection region {values.tolist()}: under 8 x 8 pixels inside the "
                                f"{width}x{height} image")
    return x1, y1, x2, y2


def _output_with_size(model: TFLiteModel, size: int, what: str) -> list[str]:
    names = [n for n, d in model.output_details.items() if int(np.prod(d["shape"])) == size]
    if not names:
        raise AssetError(f"{model.path.name}: has no output of {size} values ({what}); outputs: "
                         f"{ {n: tuple(int(v) for v in d['shape']) for n, d in model.output_details.items()} }")
    return names


class HandDetector:
    """Palm detection, then 21 hand landmarks on each palm's rotated crop; results in image pixels."""

    def __init__(self, palm_model: TFLiteModel, landmark_model: TFLiteModel, *,
                 score_thresh: float = DEFAULT_SCORE_THRESH, max_hands: int = 4,
                 presence_thresh: float = DEFAULT_PRESENCE_THRESH) -> None:
        if palm_model.input_shape() != (1, PALM_INPUT, PALM_INPUT, 3):
            raise AssetError(f"{palm_model.path.name}: expected a (1, 192, 192, 3) palm-detection input, "
                             f"got {palm_model.input_shape()}")
        if landmark_model.input_shape() != (1, LANDMARK_INPUT, LANDMARK_INPUT, 3):
            raise AssetError(f"{landmark_model.path.name}: expected a (1, 224, 224, 3) hand-landmark input, "
                             f"got {landmark_model.input_shape()}")
        if max_hands < 1:
            raise InvalidInputError(f"HandDetector: max_hands must be >= 1, got {max_hands}")
        self.palm_model = palm_model
        self.landmark_model = landmark_model
        self.score_thresh = float(score_thresh)
        self.presence_thresh = float(presence_thresh)
        self.max_hands = int(max_hands)
        self._anchors = palm_anchors()
        n = self._anchors.shape[0]
        self._regressor_name = _output_with_size(palm_model, n * PALM_NUM_COORDS, "palm boxes")[0]
        self._logit_name = _output_with_size(palm_model, n, "palm scores")[0]
        # The landmark model's outputs, in its own order: landmarks, presence, handedness, world landmarks.
        order = list(landmark_model.output_details)
        with_63 = _output_with_size(landmark_model, NUM_HAND_LANDMARKS * 3, "hand landmarks")
        scalars = _output_with_size(landmark_model, 1, "hand presence")
        self._landmark_name = min(with_63, key=order.index)
        scalars = sorted(scalars, key=order.index)
        self._presence_name = scalars[0]
        self._handedness_name = scalars[1] if len(scalars) > 1 else None

    @classmethod
    def from_store(
        cls,
        store: ModelStore,
        *,
        num_threads: int | None = None,
        score_thresh: float = DEFAULT_SCORE_THRESH,
        max_hands: int = 4,
        presence_thresh: float = DEFAULT_PRESENCE_THRESH,
    ) -> HandDetector:
        """Both models from the model store (``palm_detection_full``, ``hand_landmark_full``)."""
        return cls(TFLiteModel(store.path("palm_detection_full"), num_threads=num_threads),
                   TFLiteModel(store.path("hand_landmark_full"), num_threads=num_threads),
                   score_thresh=score_thresh, max_hands=max_hands, presence_thresh=presence_thresh)

    def detect_palms(self, image_rgb: np.ndarray, region: Sequence[float] | np.ndarray | None = None) -> list[PalmBox]:
        """Palm detections in image pixels, best first, at most ``max_hands``.

        ``region`` (x1, y1, x2, y2 pixels) limits the search to that part of the image: the detector sees
        192 x 192 pixels, so a hand that is small in a large photo is only found in a region around it
        (e.g. a few face widths around a face).
        """
        image = _check_image(image_rgb)
        x0, y0 = 0, 0
        if region is not None:
            x0, y0, x1, y1 = _region_bounds(region, image.shape)
            image = image[y0:y1, x0:x1]
        canvas, scale, pad_x, pad_y = letterbox(image, PALM_INPUT)
        outputs = self.palm_model.run((canvas.astype(np.float32) / np.float32(255.0))[None])
        boxes, scores, keypoints = decode_palms(outputs[self._regressor_name], outputs[self._logit_name],
                                                self._anchors, self.score_thresh)
        origin = np.array([x0, y0], np.float64)
        palms = [
            PalmBox(
                ((box * PALM_INPUT - [pad_x, pad_y, pad_x, pad_y]) / scale + np.tile(origin, 2)).astype(np.float32),
                score,
                ((kps * PALM_INPUT - [pad_x, pad_y]) / scale + origin).astype(np.float32),
            )
            for box, score, kps in weighted_nms(boxes, scores, keypoints, PALM_NMS_IOU)
        ]
        palms.sort(key=lambda p: -p.score)
        return palms[:self.max_hands]

    def landmarks(self, image_rgb: np.ndarray, palm: PalmBox) -> HandResult:
        """The 21 landmarks of the hand around one palm (whatever its presence score)."""
        image = _check_image(image_rgb)
        centre, side, angle = hand_roi(palm.box, palm.keypoints[WRIST], palm.keypoints[MIDDLE_FINGER_BASE])
        crop_to_image = roi_affine(centre, side, angle, LANDMARK_INPUT)
        crop = crop_roi(image, crop_to_image, LANDMARK_INPUT)
        outputs = self.landmark_model.run((crop.astype(np.float32) / np.float32(255.0))[None])
        raw = outputs[self._landmark_name].reshape(NUM_HAND_LANDMARKS, 3).astype(np.float64)
        raw[:, 2] /= LANDMARK_Z_NORMALISER
        points = project(raw, crop_to_image)
        presence = float(np.clip(outputs[self._presence_name].reshape(-1)[0], 0.0, 1.0))
        handedness = (float(np.clip(outputs[self._handedness_name].reshape(-1)[0], 0.0, 1.0))
                      if self._handedness_name is not None else None)
        box = np.concatenate([points[:, :2].min(0), points[:, :2].max(0)]).astype(np.float32)
        return HandResult(points, presence, handedness, box, float(palm.score), palm.box, palm.keypoints,
                          crop_to_image)

    def detect(self, image_rgb: np.ndarray, region: Sequence[float] | np.ndarray | None = None) -> list[HandResult]:
        """Every hand found, best palm first; a hand whose presence is below the threshold is dropped.

        ``region``: see :meth:`detect_palms`; landmarks always come from the full image, in its pixels.
        """
        image = _check_image(image_rgb)
        hands: list[HandResult] = []
        for palm in self.detect_palms(image, region):
            hand = self.landmarks(image, palm)
            if hand.score < self.presence_thresh:
                continue
            if any(_box_iou(hand.box, kept.box) > DUPLICATE_IOU for kept in hands):
                continue
            hands.append(hand)
        return hands
