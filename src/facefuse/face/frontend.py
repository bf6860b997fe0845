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

import numpy as np

from facefuse.assets.store import ModelStore
from facefuse.errors import InvalidInputError
from facefuse.face.align import arcface_blob, box_crop_224, norm_crop
from facefuse.face.facemesh import IrisLandmarks, IrisResult
from facefuse.face.types import AlignedFace, Detection
from facefuse.io.images import require_rgb_uint8

SCRFD_RELPATH = "antelopev2/scrfd_10g_bnkps.onnx"
SELECTIONS = ("all", "largest", "center")
DEFAULT_MESH_MIN_SCORE = 0.5
"""FaceMesh's face-presence score below which a BlazeFace box is dropped as a false detection."""


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

    def detect(self, image_rgb: np.ndarray) -> list[Detection]: ...


def _check_image(image_rgb: np.ndarray) -> np.ndarray:
    return require_rgb_uint8(image_rgb, "face detection")


class _OpenDetector:
    name = "blazeface-facemesh"

    def __init__(self, store: ModelStore, det_thresh: float | None, mesh_min_score: float) -> None:
        from facefuse.face.blazeface import DEFAULT_SCORE_THRESH, BlazeFaceFullRange
        from facefuse.face.facemesh import FaceMesh
        from facefuse.face.tflite import TFLiteModel

        self.store = store
        self.blazeface = BlazeFaceFullRange(TFLiteModel(store.path("blazeface_full_range")),
                                            score_thresh=DEFAULT_SCORE_THRESH if det_thresh is None else det_thresh)
        self.mesh = FaceMesh(TFLiteModel(store.path("face_landmark")))
        self.mesh_min_score = mesh_min_score

    def detect(self, image: np.ndarray) -> list[Detection]:
        from facefuse.face.facemesh import five_points

        detections = []
        for face in self.blazeface.detect(image):
            mesh = self.mesh.from_detection(image, face.box, face.keypoints[0], face.keypoints[1])
            if mesh.face_score < self.mesh_min_score:
                continue
            detections.append(Detection(box=face.box, score=face.score, kps5=five_points(mesh.landmarks),
                                        landmarks=mesh.landmarks, detector=self.name))
        return detections


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
                    det_thresh: float | None = None, mesh_min_score: float = DEFAULT_MESH_MIN_SCORE) -> FaceFrontEnd:
        """SCRFD when ``assets_dir/antelopev2/scrfd_10g_bnkps.onnx`` exists, else the open front end."""
        if assets_dir is not None and (Path(assets_dir) / SCRFD_RELPATH).is_file():
            from facefuse.face.scrfd import DET_THRESH, ScrfdDetector

            detector: FaceDetector = ScrfdDetector(Path(assets_dir) / SCRFD_RELPATH,
                                     det_thresh=DET_THRESH if det_thresh is None else det_thresh)
        else:
            detector = _OpenDetector(store, det_thresh, mesh_min_score)
        return cls(detector, selection, store)

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        image = _check_image(image_rgb)
        return select_faces(self._detector.detect(image), image.shape, self.selection)

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
