"""The gateway's visibility on the face's window equals visibility on the whole image (issue 18).

The pipeline crops the photo to the landmarks' box before the photometric, mask and hand sources run;
these tests compare it with the same sources on the uncropped photo, including a face cut by the frame.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from facefuse.assets.canonical_face import load_canonical_face
from facefuse.face.hands import HandDetector, HandResult
from facefuse.face.types import AlignedFace, Detection
from facefuse.fusion.visibility import VisibilitySources
from facefuse.pipeline.orchestration import FacePipeline, MeshClients, landmark_window
from facefuse.v1 import gateway_pb2

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "visibility_astronaut_landmarks468.npy"


class FixedHands(HandDetector):
    """A hand detector that reports given hands (image pixels), without its models."""

    def __init__(self, hands: list[np.ndarray]) -> None:
        self.hands = hands

    def detect(self, image_rgb: np.ndarray, region: object = None) -> list[HandResult]:
        return [HandResult(points=p, score=1.0, handedness=None, box=np.zeros(4, np.float32)) for p in self.hands]


def _pipeline(hands: list[np.ndarray]) -> FacePipeline:
    pipeline = FacePipeline(front_end=None, clients=MeshClients(None, None, None))  # type: ignore[arg-type]
    pipeline._hands = FixedHands(hands)
    return pipeline


def _face(landmarks: np.ndarray) -> AlignedFace:
    box = np.array([*landmarks[:, :2].min(axis=0), *landmarks[:, :2].max(axis=0)], np.float32)
    detection = Detection(box=box, score=1.0, kps5=np.zeros((5, 2), np.float32), landmarks=landmarks)
    return AlignedFace(detection, np.zeros((112, 112, 3), np.uint8), np.zeros((224, 224, 3), np.uint8),
                       np.zeros((224, 224, 3), np.float32), np.zeros((3, 112, 112), np.float32))


@pytest.fixture(scope="module")
def astronaut() -> tuple[np.ndarray, np.ndarray]:
    import skimage.data

    return skimage.data.astronaut(), np.load(FIXTURE).astype(np.float32)


def _hand_over_mouth(landmarks: np.ndarray) -> np.ndarray:
    """21 points of a hand-sized blob over the mouth and chin, reaching below the face."""
    centre = landmarks[[61, 291, 152], :2].mean(axis=0)
    angles = np.linspace(0, 2 * np.pi, 21, endpoint=False)
    radius = 0.35 * float(np.ptp(landmarks[:, 0]))
    pts = np.stack([centre[0] + radius * np.cos(angles), centre[1] + 40 + radius * np.sin(angles),
                    np.zeros(21)], axis=1)
    return pts.astype(np.float32)


@pytest.mark.parametrize("cut", [0, 60], ids=["whole-face", "face-cut-by-the-frame"])
def test_window_gives_the_whole_image_visibility(astronaut, cut: int) -> None:
    image, landmarks = astronaut
    landmarks = landmarks.copy()
    if cut:  # drop the photo's left columns up to inside the face: part of each left region is off the frame
        left = int(np.floor(landmarks[:, 0].min())) + cut
        image = np.ascontiguousarray(image[:, left:])
        landmarks[:, 0] -= left
    mask = np.zeros(image.shape[:2], np.uint8)
    eye_y = int(landmarks[159, 1])
    mask[eye_y - 6 : eye_y + 6, :] = 255  # a band across the eyes
    hand = _hand_over_mouth(landmarks)
    pipeline = _pipeline([hand])
    try:
        message = pipeline.visibility(image, _face(landmarks), mask, gateway_pb2.ProcessOptions())
    finally:
        pipeline.close()
    canonical = load_canonical_face()  # the pose source's frontal layout, as the pipeline loads it
    expected = VisibilitySources().estimate(image, landmarks, occluder_mask=mask > 127, hand_points=[hand],
                                            triangles=canonical.faces, canonical_mm=canonical.vertices_mm)
    assert message is not None
    assert dict(message.regions) == pytest.approx({k: float(v) for k, v in expected.regions.items()}, abs=1e-6)
    assert list(message.sources) == list(expected.sources) == ["mask", "photometric", "hands", "pose"]
    assert min(expected.regions.values()) < 0.9 and max(expected.regions.values()) > 0.5  # the test sees something
    rows, cols = landmark_window(landmarks, image.shape)
    assert (rows.stop - rows.start) * (cols.stop - cols.start) < 0.5 * image.shape[0] * image.shape[1]


def test_window_of_landmarks_outside_the_frame_or_not_finite_is_the_whole_image() -> None:
    shape = (100, 80, 3)
    assert landmark_window(np.full((468, 3), 500.0), shape) == (slice(0, 100), slice(0, 80))
    assert landmark_window(np.full((468, 3), np.nan), shape) == (slice(0, 100), slice(0, 80))
    points = np.zeros((468, 3))
    points[:, 0] = np.linspace(10.2, 20.7, 468)
    points[:, 1] = np.linspace(30.5, 40.1, 468)
    assert landmark_window(points, shape) == (slice(26, 46), slice(6, 26))  # floor - 4 .. ceil + 4, inclusive


def test_a_large_photo_costs_the_face_not_the_photo(astronaut) -> None:
    """The astronaut's face in the corner of a 4096² photo: visibility within a generous 1 s (the whole
    photo took about 1 s per face on this machine before)."""
    image, landmarks = astronaut
    big = np.zeros((4096, 4096, 3), np.uint8)
    big[: image.shape[0], : image.shape[1]] = image
    pipeline = _pipeline([])
    try:
        pipeline.visibility(big, _face(landmarks), None, gateway_pb2.ProcessOptions())  # warm-up (imports)
        started = time.perf_counter()
        message = pipeline.visibility(big, _face(landmarks), None, gateway_pb2.ProcessOptions())
        elapsed = time.perf_counter() - started
    finally:
        pipeline.close()
    canonical = load_canonical_face()
    expected = VisibilitySources().estimate(image, landmarks, triangles=canonical.faces,
                                            canonical_mm=canonical.vertices_mm)
    assert message is not None
    assert dict(message.regions) == pytest.approx({k: float(v) for k, v in expected.regions.items()}, abs=1e-6)
    assert elapsed < 1.0
