"""Faces across video frames: an IoU box tracker and the One Euro filter for poses over time.

Tracking: greedy IoU matching, frame by frame. Each open track is compared with the frame's boxes by
the IoU of its last box; the best pair above ``iou_threshold`` is joined first, then the next best, and
so on; a box left over starts a new track; a track that has found no box for more than ``max_gap``
frames is closed (a face that comes back later is a new track).

Smoothing: the One Euro filter (Casiez, Roussel and Vogel, CHI 2012), a first-order low-pass whose
cutoff rises with the signal's speed: ``cutoff = min_cutoff + beta·|speed|``, so a still face is
smoothed hard (no jitter) and a moving one follows with little lag. For a vector (translation,
expression) one cutoff is shared by all components (the speed is the vector's norm), so the vector is
smoothed as a whole. Rotations are smoothed on the rotation group, not on their axis-angle numbers:
each step moves the filtered rotation toward the new one along the geodesic by the filter's factor
(``R ← R·exp(α·log(Rᵀ·R_new))``), with the speed the angular velocity of that step; this works for any
head turn (no wrap-around at ±π, no averaging of axis-angle vectors). The filter is causal (each
frame sees only earlier ones), so a video can be filtered as its frames arrive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from facefuse.errors import InvalidInputError
from facefuse.face.blazeface import iou


def track_boxes(frames: list[np.ndarray], iou_threshold: float = 0.3, max_gap: int = 2) -> list[list[tuple[int, int]]]:
    """Boxes per frame ((N_t, 4) x1, y1, x2, y2 each) -> tracks, each a list of (frame, box index).

    Tracks are ordered by their first frame (then box index); within a track frames increase.
    """
    if not 0.0 < iou_threshold <= 1.0 or max_gap < 0:
        raise InvalidInputError(f"tracking: iou_threshold must be in (0, 1] and max_gap >= 0, got "
                                f"{iou_threshold}, {max_gap}")
    tracks: list[list[tuple[int, int]]] = []
    last_box: list[np.ndarray] = []
    open_tracks: list[int] = []
    for t, boxes in enumerate(frames):
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        open_tracks = [k for k in open_tracks if t - tracks[k][-1][0] <= max_gap + 1]
        taken: set[int] = set()
        if open_tracks and len(boxes):
            overlap = np.stack([iou(last_box[k], boxes) for k in open_tracks])  # (open tracks, boxes)
            for flat in np.argsort(-overlap, axis=None, kind="stable"):
                row, col = divmod(int(flat), len(boxes))
                if overlap[row, col] < iou_threshold:
                    break
                k = open_tracks[row]
                if col in taken or tracks[k][-1][0] == t:
                    continue
                tracks[k].append((t, col))
                last_box[k] = boxes[col]
                taken.add(col)
        for col in range(len(boxes)):
            if col not in taken:
                tracks.append([(t, col)])
                last_box.append(boxes[col])
                open_tracks.append(len(tracks) - 1)
    return tracks


@dataclass(frozen=True)
class OneEuro:
    """One Euro filter settings: ``min_cutoff_hz`` (smoothing of a still signal: lower is smoother),
    ``beta`` (how fast the cutoff rises with speed, per unit of the signal per second: higher lags less),
    ``d_cutoff_hz`` (the low-pass on the speed estimate itself)."""

    min_cutoff_hz: float = 1.0
    beta: float = 0.0
    d_cutoff_hz: float = 1.0

    def __post_init__(self) -> None:
        if not (self.min_cutoff_hz > 0 and self.d_cutoff_hz > 0 and self.beta >= 0):
            raise InvalidInputError(f"One Euro filter: cutoffs must be > 0 and beta >= 0, got {self}")


ROTATION_FILTER = OneEuro(min_cutoff_hz=0.8, beta=0.6)
"""Head rotation (speed in rad/s): a still head is smoothed below 1 Hz; a 1 rad/s turn raises it to 1.4 Hz."""
TRANSLATION_FILTER = OneEuro(min_cutoff_hz=0.8, beta=0.01)
"""Head position (speed in mm/s): a 100 mm/s move raises the cutoff to 1.8 Hz."""
EXPRESSION_FILTER = OneEuro(min_cutoff_hz=1.5, beta=0.05)
"""Expression (coefficients, or mm offsets per vertex; speed is the vector's norm per second): faster
than pose, since expressions change quickly."""


def _alpha(cutoff_hz: float, dt: float) -> float:
    tau = 1.0 / (2.0 * np.pi * cutoff_hz)
    return 1.0 / (1.0 + tau / dt)


def _times(times_s: np.ndarray, count: int) -> np.ndarray:
    times = np.asarray(times_s, np.float64)
    if times.shape != (count,) or not np.isfinite(times).all() or np.any(np.diff(times) <= 0):
        raise InvalidInputError(f"One Euro filter: need {count} finite, strictly increasing times")
    return times


def smooth_vectors(values: np.ndarray, times_s: np.ndarray, settings: OneEuro) -> np.ndarray:
    """(T, ...) samples at ``times_s`` -> the One Euro filtered samples (same shape, float64)."""
    x = np.asarray(values, np.float64)
    times = _times(times_s, len(x))
    if len(x) == 0:
        return x.copy()
    flat = x.reshape(len(x), -1)
    out = np.empty_like(flat)
    out[0] = flat[0]
    speed = np.zeros(flat.shape[1])
    for t in range(1, len(flat)):
        dt = times[t] - times[t - 1]
        speed += _alpha(settings.d_cutoff_hz, dt) * ((flat[t] - out[t - 1]) / dt - speed)
        cutoff = settings.min_cutoff_hz + settings.beta * float(np.linalg.norm(speed))
        out[t] = out[t - 1] + _alpha(cutoff, dt) * (flat[t] - out[t - 1])
    return out.reshape(x.shape)


def smooth_rotations(rotvecs: np.ndarray, times_s: np.ndarray, settings: OneEuro = ROTATION_FILTER) -> np.ndarray:
    """(T, 3) axis-angle rotations -> One Euro filtered on the rotation group (axis-angle, (T, 3))."""
    r = np.asarray(rotvecs, np.float64).reshape(-1, 3)
    times = _times(times_s, len(r))
    if len(r) == 0:
        return r.copy()
    rotations = Rotation.from_rotvec(r)
    current = rotations[0]
    out = [current.as_rotvec()]
    velocity = np.zeros(3)  # rad/s in the filtered head's own frame
    for t in range(1, len(r)):
        dt = times[t] - times[t - 1]
        step = (current.inv() * rotations[t]).as_rotvec()  # geodesic from the filtered pose to the new one
        velocity += _alpha(settings.d_cutoff_hz, dt) * (step / dt - velocity)
        cutoff = settings.min_cutoff_hz + settings.beta * float(np.linalg.norm(velocity))
        current = current * Rotation.from_rotvec(_alpha(cutoff, dt) * step)
        out.append(current.as_rotvec())
    return np.stack(out)


def rotation_jitter_deg(rotvecs: np.ndarray) -> float:
    """RMS angle (degrees) between consecutive rotations: what a viewer sees as shaking."""
    r = Rotation.from_rotvec(np.asarray(rotvecs, np.float64).reshape(-1, 3))
    if len(r) < 2:
        return 0.0
    steps = (r[:-1].inv() * r[1:]).magnitude()
    return float(np.degrees(np.sqrt(np.mean(steps**2))))


def vector_jitter(values: np.ndarray) -> float:
    """RMS norm of the step between consecutive samples (in the values' unit)."""
    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return 0.0
    steps = np.diff(x.reshape(len(x), -1), axis=0)
    return float(np.sqrt(np.mean(np.sum(steps**2, axis=1))))
