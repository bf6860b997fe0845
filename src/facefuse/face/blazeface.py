"""BlazeFace full-range face detector (MediaPipe, Apache-2.0), decoded from the model's published facts.

Model facts (MediaPipe ``face_detection_full_range`` graph options):
* input 192 x 192 RGB, float in [-1, 1], the image letterboxed (aspect ratio kept, centred);
* SSD anchors: one layer of stride 4 (48 x 48 cells), one anchor per cell of fixed size 1 (no
  interpolated anchor), centres at ((col + 0.5) / 48, (row + 0.5) / 48), row-major: 2304 anchors;
* regressors (2304, 16) in input pixels: box centre x, y offsets and width, height (x first), then
  six key-points (x, y) as offsets from the anchor centre; all divided by 192 (the x/y/w/h scales);
* classificator logits (2304, 1): score = sigmoid(clip(logit, -100, 100));
* weighted non-maximum suppression with IoU threshold 0.3: each kept face is the score-weighted
  mean of the boxes and key-points it suppresses.
Key-points, in order: the eye on the image left (the subject's right eye), the eye on the image
right, nose tip, mouth centre, image-left ear tragion, image-right ear tragion.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from facefuse.face.tflite import TFLiteModel

INPUT_SIZE = 192
STRIDE = 4
NUM_COORDS = 16
NUM_KEYPOINTS = 6
SCORE_CLIP = 100.0
DEFAULT_SCORE_THRESH = 0.5
DEFAULT_NMS_IOU = 0.3


@dataclass
class FaceBox:
    """A BlazeFace detection in image pixels: box x1, y1, x2, y2, score, six key-points (6, 2)."""

    box: np.ndarray
    score: float
    keypoints: np.ndarray


def anchor_centres(input_size: int = INPUT_SIZE, stride: int = STRIDE) -> np.ndarray:
    """(N, 2) normalised anchor centres x, y in row-major cell order."""
    cells = input_size // stride
    rows, cols = np.mgrid[0:cells, 0:cells]
    return np.stack([(cols.ravel() + 0.5) / cells, (rows.ravel() + 0.5) / cells], axis=1).astype(np.float32)


def letterbox(image: np.ndarray, size: int = INPUT_SIZE) -> tuple[np.ndarray, float, float, float]:
    """Resize keeping the aspect ratio into a centred ``size`` square; returns (canvas, scale, pad_x, pad_y)."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resized
    return canvas, scale, float(pad_x), float(pad_y)


def decode(regressors: np.ndarray, logits: np.ndarray, anchors: np.ndarray, score_thresh: float,
           input_size: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw tensors -> (boxes (K, 4) xyxy, scores (K,), key-points (K, 6, 2)), normalised to the input."""
    raw = regressors.reshape(-1, NUM_COORDS).astype(np.float64) / input_size
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits.reshape(-1).astype(np.float64), -SCORE_CLIP, SCORE_CLIP)))
    keep = scores >= score_thresh
    raw, scores, anchors = raw[keep], scores[keep], anchors[keep].astype(np.float64)
    cx, cy = raw[:, 0] + anchors[:, 0], raw[:, 1] + anchors[:, 1]
    w, h = raw[:, 2], raw[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    keypoints = raw[:, 4:].reshape(-1, NUM_KEYPOINTS, 2) + anchors[:, None, :]
    return boxes, scores, keypoints


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, keypoints: np.ndarray, iou_thresh: float
                 ) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """Blend each cluster (IoU > threshold with its best member) by score; keep the best score."""
    order = np.argsort(-scores, kind="stable")
    remaining = order
    out: list[tuple[np.ndarray, float, np.ndarray]] = []
    while remaining.size:
        best = remaining[0]
        overlaps = iou(boxes[best], boxes[remaining])
        cluster = remaining[overlaps > iou_thresh]
        cluster = cluster if cluster.size else remaining[:1]
        weights = scores[cluster][:, None]
        box = (boxes[cluster] * weights).sum(0) / weights.sum()
        kps = (keypoints[cluster] * weights[:, :, None]).sum(0) / weights.sum()
        out.append((box, float(scores[best]), kps))
        remaining = remaining[~np.isin(remaining, cluster)]
    return out


class BlazeFaceFullRange:
    """Runs the full-range BlazeFace model on an RGB image and returns faces in image pixels."""

    def __init__(self, model: TFLiteModel, score_thresh: float = DEFAULT_SCORE_THRESH,
                 nms_iou: float = DEFAULT_NMS_IOU) -> None:
        shape = model.input_shape()
        if shape != (1, INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(
                f"{model.path.name}: expected a (1, 192, 192, 3) input (full-range BlazeFace), got {shape}"
            )
        self.model = model
        self.score_thresh = score_thresh
        self.nms_iou = nms_iou
        self._anchors = anchor_centres()
        outputs = model.output_details
        self._regressor_name = next(n for n, d in outputs.items() if int(d["shape"][-1]) == NUM_COORDS)
        self._logit_name = next(n for n, d in outputs.items() if int(d["shape"][-1]) == 1)

    def detect(self, image_rgb: np.ndarray, score_thresh: float | None = None) -> list[FaceBox]:
        """Faces scoring at least ``score_thresh`` (default: the one given at construction)."""
        return self.faces(self.raw(image_rgb), score_thresh)

    def raw(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, float]:
        """One run of the network: (regressors, logits, letterbox scale, pad x, pad y), for ``faces``."""
        canvas, scale, pad_x, pad_y = letterbox(image_rgb)
        tensor = (canvas.astype(np.float32) / np.float32(127.5) - np.float32(1.0))[None]
        outputs = self.model.run(tensor)
        return outputs[self._regressor_name], outputs[self._logit_name], scale, pad_x, pad_y

    def faces(self, raw: tuple[np.ndarray, np.ndarray, float, float, float],
              score_thresh: float | None = None) -> list[FaceBox]:
        """Decode, threshold and merge one run's output; several thresholds can share one run."""
        regressors, logits, scale, pad_x, pad_y = raw
        thresh = self.score_thresh if score_thresh is None else score_thresh
        boxes, scores, keypoints = decode(regressors, logits, self._anchors, thresh)
        faces: list[FaceBox] = []
        for box, score, kps in weighted_nms(boxes, scores, keypoints, self.nms_iou):
            box_px = (box * INPUT_SIZE - [pad_x, pad_y, pad_x, pad_y]) / scale
            kps_px = (kps * INPUT_SIZE - [pad_x, pad_y]) / scale
            faces.append(FaceBox(box_px.astype(np.float32), score, kps_px.astype(np.float32)))
        return faces
