"""The gateway's face front end: detect faces, choose which to keep, align each into network inputs.

Two detectors behind one interface:
* ``scrfd``: insightface SCRFD-10GF (the official pipelines' detector) when the licence-gated
  ``antelopev2/scrfd_10g_bnkps.onnx`` is in the user's assets folder;
* ``blazeface-facemesh``: the open default, BlazeFace full range + 468-point FaceMesh from the model
  store. Its 5 alignment points come from the mesh (see ``facefuse.face.facemesh.five_points``) and
  ``Detection.landmarks`` carries the 468 points.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from facefuse.assets.store import ModelStore
from facefuse.errors import InvalidInputError
from facefuse.face.align import arcface_blob, box_crop_224, norm_crop
from facefuse.face.facemesh import IrisLandmarks, IrisResult
from facefuse.face.types import AlignedFace, Detection, check_det_thresh
from facefuse.io.images import require_rgb_uint8

SCRFD_RELPATH = "antelopev2/scrfd_10g_bnkps.onnx"
SELECTIONS = ("all", "largest", "center")
DEFAULT_MESH_MIN_SCORE = 0.5
"""FaceMesh's face-presence score below which a BlazeFace box is dropped as a false detection."""
SECOND_CHANCE_MARGIN = 0.15
"""Boxes scoring in [threshold - margin, threshold) get a second chance: occluded faces (a hand over the
mouth, a cigarette, sunglasses) often score just under the threshold while FaceMesh is sure."""
CONFIRM_MESH_SCORE = 0.9
"""FaceMesh's face score that confirms a face the detector alone did not pass (second chance, whole image)."""
ZOOM_OUT_PAD = 0.5
"""The zoom-out pass pads each side by this fraction of the photo's longer side: full-range BlazeFace is
made for faces that fill a small part of the frame, and scores face-filling crops low."""
ZOOM_OUT_SIDE = 384
"""The zoom-out pass works on a copy at most this long (2 x the detector's 192 px input)."""
WHOLE_IMAGE_MIN_FACE = 0.3
"""The whole-image path keeps a face only if its landmarks span at least this fraction of the photo's
longer side (the case it exists for is a crop the face fills, not a small face the detector missed)."""


def select_faces(detections: list[Detection], image_shape: tuple[int, ...], selection: str) -> list[Detection]:
    """``all`` (detector order), ``largest`` (box area) or ``center`` (box centre nearest the image centre)."""
    if selection not in SELECTIONS:
        raise InvalidInputError(f"face selection must be one of {SELECTIONS}, got {selection!r}")
    if selection == "all" or len(detections) <= 1:
        return list(detections)
    if selection == "largest":
        return [max(detections, key=lambda d: d.area)]
    cy, cx = image_shape[0] / 2.0, image_shape[1] / 2.0
    return [min(detections, key=lambda d: (d.center[0] - cx) ** 2 + (d.center[1] - cy) ** 2)]


class FaceDetector(Protocol):
    """What the front end needs of a detector: a name for reports and boxes with 5 points."""

    @property
    def name(self) -> str: ...

    def detect(self, image_rgb: np.ndarray, det_thresh: float | None = None) -> list[Detection]: ...


def _check_image(image_rgb: np.ndarray) -> np.ndarray:
    return require_rgb_uint8(image_rgb, "face detection")


class _OpenDetector:
    """BlazeFace + FaceMesh, with three ways to find faces the plain threshold misses (docs/open-pack.md):
    a second chance for near-threshold boxes, a zoom-out pass and the whole photo as the box for crops."""

    name = "blazeface-facemesh"

    def __init__(self, store: ModelStore, det_thresh: float | None, mesh_min_score: float,
                 recover_missed: bool = True) -> None:
        from facefuse.face.blazeface import DEFAULT_SCORE_THRESH, BlazeFaceFullRange
        from facefuse.face.facemesh import FaceMesh
        from facefuse.face.tflite import TFLiteModel

        thresh = check_det_thresh(det_thresh)
        self.store = store
        self.blazeface = BlazeFaceFullRange(TFLiteModel(store.path("blazeface_full_range")),
                                            score_thresh=DEFAULT_SCORE_THRESH if thresh is None else thresh)
        self.mesh = FaceMesh(TFLiteModel(store.path("face_landmark")))
        self.mesh_min_score = mesh_min_score
        self.recover_missed = recover_missed

    def detect(self, image: np.ndarray, det_thresh: float | None = None) -> list[Detection]:
        thresh = self.blazeface.score_thresh if det_thresh is None else float(det_thresh)
        detections = self._from_detector(image, image, thresh, 0.0, 1.0, "detector")
        if detections or not self.recover_missed:
            return detections
        # Nothing found: perhaps a crop the face fills. First the detector on a zoomed-out copy (made from
        # a copy at most ZOOM_OUT_SIDE px long: the detector sees 192 px anyway, and a big photo padded at
        # full size would take four times its memory) ...
        h, w = image.shape[:2]
        scale = min(1.0, ZOOM_OUT_SIDE / max(h, w))
        small = image if scale == 1.0 else cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                       interpolation=cv2.INTER_AREA)
        pad = round(max(small.shape[:2]) * ZOOM_OUT_PAD)
        padded = cv2.copyMakeBorder(small, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        detections = self._from_detector(padded, image, thresh, float(pad), scale, "zoom_out")
        if detections:
            return detections
        # ... then the whole photo as the face box, kept only when FaceMesh is sure twice.
        whole = self._whole_image(image)
        return [whole] if whole is not None else []

    def _from_detector(self, searched: np.ndarray, image: np.ndarray, thresh: float, pad: float, scale: float,
                       found_by: str) -> list[Detection]:
        """Faces the detector finds in ``searched`` (``image`` resized by ``scale``, then padded by ``pad``
        px on every side), mapped back and meshed on ``image``."""
        from facefuse.face.blazeface import iou

        raw = self.blazeface.raw(searched)
        passed = self.blazeface.faces(raw, thresh)
        near = [f for f in self.blazeface.faces(raw, max(thresh - SECOND_CHANCE_MARGIN, thresh / 2.0))
                if f.score < thresh] if self.recover_missed else []
        if passed:  # a near box that overlaps a passed one is the same face, not a second one
            kept = np.stack([f.box for f in passed])
            near = [f for f in near if not np.any(iou(f.box, kept) > self.blazeface.nms_iou)]
        near_found_by = "second_chance" if found_by == "detector" else found_by  # zoom_out covers its own near boxes
        detections = []
        for face, min_score, how in [*((f, self.mesh_min_score, found_by) for f in passed),
                                     *((f, CONFIRM_MESH_SCORE, near_found_by) for f in near)]:
            box = (face.box - pad) / scale
            kps = (face.keypoints - pad) / scale
            detection = self._meshed(image, box, kps[0], kps[1], face.score, min_score, how)
            if detection is not None:
                detections.append(detection)
        return detections

    def _meshed(self, image: np.ndarray, box: np.ndarray, left_eye: np.ndarray, right_eye: np.ndarray,
                score: float, min_mesh_score: float, found_by: str) -> Detection | None:
        from facefuse.face.facemesh import five_points

        mesh = self.mesh.from_detection(image, box, left_eye, right_eye)
        if mesh.face_score < min_mesh_score:
            return None
        return Detection(box=box, score=score, kps5=five_points(mesh.landmarks), landmarks=mesh.landmarks,
                         detector=self.name, found_by=found_by)

    def _whole_image(self, image: np.ndarray) -> Detection | None:
        """The photo as the face box (its square padded by FaceMesh's ROI margin); then FaceMesh again on
        the ROI its own landmarks give. Both runs must score CONFIRM_MESH_SCORE: a single run on a
        face-free photo can be fooled (skimage's coffee cup scores 0.95 on the first, 0.29 on the second)."""
        from facefuse.face.facemesh import EYE_CORNERS_IMAGE_LEFT, EYE_CORNERS_IMAGE_RIGHT

        h, w = image.shape[:2]
        box = np.array([0.0, 0.0, w, h])
        first = self.mesh.from_detection(image, box, np.array([0.0, h / 2.0]), np.array([w, h / 2.0]))
        if first.face_score < CONFIRM_MESH_SCORE:
            return None
        points = first.landmarks[:, :2]
        box = np.concatenate([points.min(0), points.max(0)])
        left_eye = points[list(EYE_CORNERS_IMAGE_LEFT)].mean(0)
        right_eye = points[list(EYE_CORNERS_IMAGE_RIGHT)].mean(0)
        detection = self._meshed(image, box, left_eye, right_eye, first.face_score, CONFIRM_MESH_SCORE,
                                 "whole_image")
        if detection is None:
            return None
        assert detection.landmarks is not None
        refined = detection.landmarks[:, :2]
        detection.box = np.concatenate([refined.min(0), refined.max(0)]).astype(np.float32)
        return detection if detection.width >= WHOLE_IMAGE_MIN_FACE * max(h, w) else None


class FaceFrontEnd:
    """Detect + select + align. Build it with ``from_assets``; ``name`` says which detector runs."""

    def __init__(self, detector: FaceDetector, selection: str = "all", store: ModelStore | None = None) -> None:
        if selection not in SELECTIONS:
            raise InvalidInputError(f"face selection must be one of {SELECTIONS}, got {selection!r}")
        self._detector = detector
        self.selection = selection
        self._store = store
        self._iris: IrisLandmarks | None = None
        self._iris_lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._detector.name

    @classmethod
    def from_assets(cls, assets_dir: Path | None, store: ModelStore, *, selection: str = "all",
                    det_thresh: float | None = None, mesh_min_score: float = DEFAULT_MESH_MIN_SCORE,
                    recover_missed: bool = True) -> FaceFrontEnd:
        """SCRFD when ``assets_dir/antelopev2/scrfd_10g_bnkps.onnx`` exists, else the open front end.

        ``det_thresh`` (0 < t < 1; None: the detector's own default, 0.4 SCRFD, 0.5 BlazeFace) is the
        detector score a face needs; out of range is an ``InvalidInputError``.

        ``recover_missed=False`` turns the open front end's second chance, zoom-out pass and whole-image
        path off: the detector and its threshold alone, as before issue 16 (for before/after studies).
        """
        det_thresh = check_det_thresh(det_thresh)
        if assets_dir is not None and (Path(assets_dir) / SCRFD_RELPATH).is_file():
            from facefuse.face.scrfd import DET_THRESH, ScrfdDetector

            detector: FaceDetector = ScrfdDetector(Path(assets_dir) / SCRFD_RELPATH,
                                     det_thresh=DET_THRESH if det_thresh is None else det_thresh)
        else:
            detector = _OpenDetector(store, det_thresh, mesh_min_score, recover_missed)
        return cls(detector, selection, store)

    def detect(self, image_rgb: np.ndarray, det_thresh: float | None = None) -> list[Detection]:
        """Faces in the image; ``det_thresh`` (0 < t < 1) overrides the detector's threshold for this call."""
        image = _check_image(image_rgb)
        thresh = check_det_thresh(det_thresh)
        return select_faces(self._detector.detect(image, det_thresh=thresh), image.shape, self.selection)

    def align(self, image_rgb: np.ndarray, detection: Detection) -> AlignedFace:
        image = _check_image(image_rgb)
        crop112 = norm_crop(image, detection.kps5, 112)
        return AlignedFace(
            detection=detection,
            crop112=crop112,
            crop224=norm_crop(image, detection.kps5, 224),
            crop_box224=box_crop_224(image, detection.box),
            arcface_blob=arcface_blob(crop112),
        )

    def estimate_iris(self, image_rgb: np.ndarray, landmarks: np.ndarray) -> IrisResult:
        """Iris centres and diameters in pixels for a 468-point mesh (``Detection.landmarks``).

        Used for metric scale: the human iris diameter is nearly constant (about 11.7 mm).
        """
        from facefuse.face.tflite import TFLiteModel

        if landmarks is None or np.asarray(landmarks).shape[0] < 468:
            raise InvalidInputError("iris estimation needs the 468 FaceMesh landmarks of the face")
        with self._iris_lock:
            if self._iris is None:
                store = self._store if self._store is not None else ModelStore()
                self._iris = IrisLandmarks(TFLiteModel(store.path("iris_landmark")))
        return self._iris.estimate(_check_image(image_rgb), landmarks)
