"""What the face front end hands to the rest of the pipeline: detections and aligned crops."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from facefuse.errors import InvalidInputError

KPS5_ORDER = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")
"""Order of ``Detection.kps5``. Left/right are **image** left/right (insightface's convention): the
"left eye" is the one with the smaller x in an upright frontal photo, i.e. the subject's right eye."""


FOUND_BY = ("detector", "second_chance", "zoom_out", "whole_image")
"""How a face was found (``Detection.found_by``): the detector's score passed the threshold; it scored
just under it and FaceMesh confirmed it; it was found on a zoomed-out (padded) copy of a face-filling
photo (by either of the first two rules); or the whole photo was taken as the face box and FaceMesh
confirmed it (docs/open-pack.md)."""


def check_det_thresh(value: float | str | None, what: str = "detection threshold") -> float | None:
    """None (the front end's default) or a number strictly between 0 and 1; anything else is refused."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} {value!r}: expected a number between 0 and 1 (exclusive)") from None
    if not math.isfinite(number) or not 0.0 < number < 1.0:
        raise InvalidInputError(f"{what} {value!r}: expected a number between 0 and 1 (exclusive), e.g. 0.5")
    return number


def det_thresh_argument(value: str) -> float:
    """argparse ``type`` of every ``--det-thresh`` flag (CLI, gateway, demo, bench): a usage error, not a traceback."""
    import argparse

    try:
        thresh = check_det_thresh(value, "--det-thresh")
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    assert thresh is not None
    return thresh


@dataclass
class Detection:
    """One face in image pixel coordinates (x right, y down) of the image it was detected in.

    ``box`` is float32 (4,) x1, y1, x2, y2; ``kps5`` float32 (5, 2) in ``KPS5_ORDER``; ``landmarks``
    (N, 3) float32, e.g. the 468 FaceMesh points: x, y in image pixels and z a relative depth in the
    same pixel scale (smaller = closer to the camera), or None when no dense landmarks were run.
    ``detector`` names what produced it ("scrfd", "blazeface-facemesh").
    """

    box: np.ndarray
    score: float
    kps5: np.ndarray
    landmarks: np.ndarray | None = None
    detector: str = ""
    iris: np.ndarray | None = None  # (2, 3) float32: per eye (image-left, image-right) centre x, y, diameter px
    found_by: str = "detector"  # one of FOUND_BY

    def __post_init__(self) -> None:
        self.box = np.asarray(self.box, dtype=np.float32).reshape(4)
        self.kps5 = np.asarray(self.kps5, dtype=np.float32).reshape(5, 2)
        self.score = float(self.score)
        if self.landmarks is not None:
            self.landmarks = np.asarray(self.landmarks, dtype=np.float32)
        if self.iris is not None:
            self.iris = np.asarray(self.iris, dtype=np.float32).reshape(2, 3)

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        return float(self.box[0] + self.box[2]) / 2.0, float(self.box[1] + self.box[3]) / 2.0


@dataclass
class AlignedFace:
    """Every per-face input the networks take, made once by the gateway.

    * ``crop112``: uint8 (112, 112, 3) RGB, ArcFace ``norm_crop`` (§1.2).
    * ``crop224``: uint8 (224, 224, 3) RGB, ``norm_crop`` at 224 (MICA's saved "image").
    * ``crop_box224``: float32 (224, 224, 3) in [0, 1], the 1.6-scale box crop (§1.4).
    * ``arcface_blob``: float32 (3, 112, 112), (p - 127.5) / 127.5, channels **RGB** (what gen_mod
      feeds ArcFace, §1.3).
    * ``farl_input``: float32 (3, 224, 224) from ``facefuse.face.farl_preprocess``; filled by the
      pipeline, None until then.
    """

    detection: Detection
    crop112: np.ndarray
    crop224: np.ndarray
    crop_box224: np.ndarray
    arcface_blob: np.ndarray
    farl_input: np.ndarray | None = None
