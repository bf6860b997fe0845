"""468-point FaceMesh and MediaPipe Iris on rotation-normalised crops (MediaPipe models, Apache-2.0).

Model facts (MediaPipe face_landmark / iris_landmark graphs):
* Face ROI from a detection: centred on the detection box, a square whose side is 1.5 x the box's
  longer side, rotated so the line from the image-left eye to the image-right eye key-point is
  horizontal; pixels outside the image replicate the border.
* FaceMesh input 192 x 192 RGB in [0, 1]; outputs 1404 = 468 x (x, y, z) in crop pixels (z in the
  same pixel scale, relative to the face centre, smaller = closer) and one face-presence logit.
* Iris ROI: a square of 2.3 x the eye-corner distance, centred between the corners and rotated
  along them; corners (33, 133) for the image-left eye and (362, 263) for the image-right eye. Input
  64 x 64 RGB in [0, 1]; the model is trained on one eye side, so the image-right eye crop is mirrored
  before inference and the x outputs mirrored back. Outputs: 71 eye-contour points and 5 iris points
  (centre first, then 4 on the iris boundary), each (x, y, z) in crop pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from facefuse.face.tflite import TFLiteModel

MESH_INPUT = 192
NUM_LANDMARKS = 468
FACE_ROI_SCALE = 1.5
IRIS_INPUT = 64
IRIS_ROI_SCALE = 2.3

# Landmark indices used for the 5 ArcFace points (facts of the MediaPipe 468-point topology).
# Eye contours: 16 points around each eyelid opening. Their mean is the eye centre, close to the
# pupil for an open eye and stable for a closed one (the corners alone sit too low and too wide).
EYE_CONTOUR_IMAGE_LEFT = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
EYE_CONTOUR_IMAGE_RIGHT = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
NOSE_TIP = 1  # the most protruding nose point; 4 sits slightly higher on the ridge
MOUTH_CORNER_IMAGE_LEFT = 61
MOUTH_CORNER_IMAGE_RIGHT = 291
EYE_CORNERS_IMAGE_LEFT = (33, 133)  # outer, inner
EYE_CORNERS_IMAGE_RIGHT = (362, 263)  # inner, outer


@dataclass
class MeshResult:
    landmarks: np.ndarray  # (468, 3) float32, image pixels (z scaled like x, y)
    face_score: float  # sigmoid of the face-presence logit
    crop_to_image: np.ndarray  # (2, 3) affine of the ROI


@dataclass
class IrisResult:
    """Per eye, ordered [image-left eye, image-right eye]."""

    centres: np.ndarray  # (2, 2) float32 image pixels
    diameters: np.ndarray  # (2,) float32 pixels
    iris_points: np.ndarray  # (2, 5, 3) float32 image pixels
    eye_contours: np.ndarray  # (2, 71, 3) float32 image pixels

    def as_detection_iris(self) -> np.ndarray:
        """(2, 3) float32 per eye: centre x, y and diameter, the form ``Detection.iris`` carries."""
        return np.concatenate([np.asarray(self.centres, np.float32),
                               np.asarray(self.diameters, np.float32)[:, None]], axis=1)


def roi_affine(centre: np.ndarray, side: float, angle: float, out_size: int) -> np.ndarray:
    """(2, 3) crop -> image affine of a square ROI: crop pixel (u, v) lands at
    centre + R(angle) @ ((u, v) - out_size / 2) * side / out_size (image y points down)."""
    k = side / out_size
    c, s = np.cos(angle), np.sin(angle)
    linear = k * np.array([[c, -s], [s, c]])
    offset = np.asarray(centre, np.float64) - linear @ np.array([out_size / 2.0, out_size / 2.0])
    return np.hstack([linear, offset[:, None]])


def crop_roi(image: np.ndarray, crop_to_image: np.ndarray, out_size: int) -> np.ndarray:
    image_to_crop = cv2.invertAffineTransform(crop_to_image)
    return cv2.warpAffine(image, image_to_crop, (out_size, out_size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def face_roi(box: np.ndarray, left_eye: np.ndarray, right_eye: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Centre, side and angle of the FaceMesh ROI for a detection box and its two eye key-points."""
    box = np.asarray(box, np.float64)
    centre = np.array([(box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0])
    side = max(box[2] - box[0], box[3] - box[1]) * FACE_ROI_SCALE
    d = np.asarray(right_eye, np.float64) - np.asarray(left_eye, np.float64)
    return centre, float(side), float(np.arctan2(d[1], d[0]))


def project(points: np.ndarray, crop_to_image: np.ndarray) -> np.ndarray:
    """Crop-pixel (x, y, z) points -> image pixels; z scales like x and y."""
    scale = float(np.sqrt(abs(np.linalg.det(crop_to_image[:, :2]))))
    xy = points[:, :2].astype(np.float64) @ crop_to_image[:, :2].T + crop_to_image[:, 2]
    z = points[:, 2:3].astype(np.float64) * scale
    return np.hstack([xy, z]).astype(np.float32)


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """The 5 ArcFace points (image left eye, right eye, nose tip, left and right mouth corner)."""
    lm = np.asarray(landmarks)[:, :2].astype(np.float64)
    return np.stack([
        lm[list(EYE_CONTOUR_IMAGE_LEFT)].mean(0),
        lm[list(EYE_CONTOUR_IMAGE_RIGHT)].mean(0),
        lm[NOSE_TIP],
        lm[MOUTH_CORNER_IMAGE_LEFT],
        lm[MOUTH_CORNER_IMAGE_RIGHT],
    ]).astype(np.float32)


class FaceMesh:
    """Runs the 468-point FaceMesh model on the ROI of one detection."""

    def __init__(self, model: TFLiteModel) -> None:
        if model.input_shape() != (1, MESH_INPUT, MESH_INPUT, 3):
            raise ValueError(
                f"{model.path.name}: expected a (1, 192, 192, 3) FaceMesh input, got {model.input_shape()}"
            )
        self.model = model
        outputs = model.output_details
        self._landmark_name = next(n for n, d in outputs.items() if int(np.prod(d["shape"])) == NUM_LANDMARKS * 3)
        self._flag_name = next(n for n, d in outputs.items() if int(np.prod(d["shape"])) == 1)

    def run(self, image_rgb: np.ndarray, centre: np.ndarray, side: float, angle: float) -> MeshResult:
        crop_to_image = roi_affine(centre, side, angle, MESH_INPUT)
        crop = crop_roi(image_rgb, crop_to_image, MESH_INPUT)
        outputs = self.model.run((crop.astype(np.float32) / np.float32(255.0))[None])
        points = outputs[self._landmark_name].reshape(NUM_LANDMARKS, 3)
        logit = float(np.clip(outputs[self._flag_name].reshape(-1)[0], -100, 100))
        return MeshResult(project(points, crop_to_image), 1.0 / (1.0 + np.exp(-logit)), crop_to_image)

    def from_detection(self, image_rgb: np.ndarray, box: np.ndarray, left_eye: np.ndarray,
                       right_eye: np.ndarray) -> MeshResult:
        centre, side, angle = face_roi(box, left_eye, right_eye)
        return self.run(image_rgb, centre, side, angle)


class IrisLandmarks:
    """MediaPipe Iris on both eyes of a 468-point mesh: iris centres and diameters in pixels."""

    def __init__(self, model: TFLiteModel) -> None:
        if model.input_shape() != (1, IRIS_INPUT, IRIS_INPUT, 3):
            raise ValueError(f"{model.path.name}: expected a (1, 64, 64, 3) iris input, got {model.input_shape()}")
        self.model = model
        outputs = model.output_details
        self._iris_name = next(n for n, d in outputs.items() if int(np.prod(d["shape"])) == 15)
        self._contour_name = next(n for n, d in outputs.items() if int(np.prod(d["shape"])) == 213)

    def _one_eye(self, image_rgb: np.ndarray, start: np.ndarray, end: np.ndarray, mirror: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
        d = end - start
        side = float(np.hypot(*d)) * IRIS_ROI_SCALE
        crop_to_image = roi_affine((start + end) / 2.0, side, float(np.arctan2(d[1], d[0])), IRIS_INPUT)
        crop = crop_roi(image_rgb, crop_to_image, IRIS_INPUT)
        if mirror:
            crop = crop[:, ::-1]
        outputs = self.model.run((np.ascontiguousarray(crop).astype(np.float32) / np.float32(255.0))[None])
        iris = outputs[self._iris_name].reshape(5, 3).astype(np.float64)
        contour = outputs[self._contour_name].reshape(71, 3).astype(np.float64)
        if mirror:
            iris[:, 0] = IRIS_INPUT - iris[:, 0]
            contour[:, 0] = IRIS_INPUT - contour[:, 0]
        return project(iris, crop_to_image), project(contour, crop_to_image)

    def estimate(self, image_rgb: np.ndarray, landmarks: np.ndarray) -> IrisResult:
        lm = np.asarray(landmarks)[:, :2].astype(np.float64)
        left = self._one_eye(image_rgb, lm[EYE_CORNERS_IMAGE_LEFT[0]], lm[EYE_CORNERS_IMAGE_LEFT[1]], mirror=False)
        right = self._one_eye(image_rgb, lm[EYE_CORNERS_IMAGE_RIGHT[0]], lm[EYE_CORNERS_IMAGE_RIGHT[1]], mirror=True)
        iris = np.stack([left[0], right[0]])
        # Diameter: mean of the two boundary-to-boundary spans (points 1-3 and 2-4).
        spans = np.stack([np.linalg.norm(iris[:, 1, :2] - iris[:, 3, :2], axis=1),
                          np.linalg.norm(iris[:, 2, :2] - iris[:, 4, :2], axis=1)])
        return IrisResult(iris[:, 0, :2].astype(np.float32), spans.mean(0).astype(np.float32), iris,
                          np.stack([left[1], right[1]]))
