"""The slots a model pack fills, and what each slot returns.

A pack (``flame``: the official models; ``open``: registry-shipped models) provides a deterministic
shape backend for the mica service, a generative backend for the ofer service, and the topology the
fusion service works on. Services only see these interfaces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from facefuse.errors import AssetError
from facefuse.face.types import AlignedFace
from facefuse.fusion.space import ShapeSpace

if TYPE_CHECKING:
    from facefuse.fusion.visibility import Visibility


@dataclass(frozen=True)
class BackendStatus:
    service: str
    backend: str
    pack: str
    ready: bool
    placeholder: bool
    message: str
    device: str = "cpu"
    details: dict[str, str] = field(default_factory=dict)


SCALE_SOURCES = ("iris", "default")
"""Where a shape backend's metric scale came from: the iris (about 11.7 mm across in every adult) or the
default (a mean-sized face). A backend whose model predicts metric shapes directly (MICA) reports none."""


@dataclass
class ShapeResult:
    """One face's deterministic reconstruction. Lengths in millimetres."""

    vertices_mm: np.ndarray            # (V,3) float32
    faces: np.ndarray                  # (F,3) int32
    topology: str
    shape: np.ndarray | None = None    # (300,) float32 FLAME shape coefficients
    identity: np.ndarray | None = None  # (512,) float32
    landmarks68_mm: np.ndarray | None = None
    kpt7_mm: np.ndarray | None = None
    uvs: np.ndarray | None = None      # (V,2) float32 texture coordinates, when the topology has them
    scale_source: str = ""             # "iris" | "default" where the metric scale is estimated (open pack)
    scale_confidence: float = 0.0      # [0, 1] confidence of that scale


StopCheck = Callable[[], None]
"""Called by long work between its steps; raises (``CancelledError``, ``DeadlineError``) when the caller is
gone, so the work stops there. A service passes its call's ``Deadline.check``; pure code never imports grpc."""


class ShapeBackend(Protocol):
    status: BackendStatus

    def predict(self, faces: Sequence[AlignedFace]) -> list[ShapeResult]: ...


class GenerativeBackend(Protocol):
    status: BackendStatus

    def sample(self, face: AlignedFace, num_samples: int, *, mode: str, steps: int, seed: int,
               start_shape: np.ndarray | None, start_t0: int,
               guide_shape: np.ndarray | None, guide_strength: float,
               visibility: Visibility | None = None, stop_check: StopCheck | None = None) -> np.ndarray:
        """(N,K) shapes. ``visibility``: what the image shows (regions, maybe per vertex), when known;
        ``stop_check``: called between steps, its exception ends the work early."""
        ...

    def rank(self, face: AlignedFace, candidates: np.ndarray, visibility: Visibility | None = None,
             stop_check: StopCheck | None = None) -> np.ndarray:
        """(N,) raw scores, higher is better; independent of the candidates' order."""
        ...


@dataclass(frozen=True)
class PosedFaceResult:
    """One face as photographed (names as in params.json); float32 arrays, camera space in mm."""

    expression: np.ndarray  # (K,)
    jaw_pose: np.ndarray  # (3,)
    global_pose: np.ndarray  # (3,)
    translation: np.ndarray  # (3,)
    camera_intrinsics: np.ndarray  # (3,3)
    camera_extrinsics: np.ndarray  # (4,4)
    image_size: np.ndarray  # (2,) int32 width, height
    focal_source: str
    reprojection_error_px: float
    vertices_mm: np.ndarray  # (V,3) camera space
    landmarks_px: np.ndarray  # (L,2)


@dataclass(frozen=True)
class PoseFitTarget:
    """What the fit is given for one face: detected points, their visibility, the photo's camera."""

    landmarks_px: np.ndarray  # (468+, 3) FaceMesh points, x, y in px
    visibility: np.ndarray | None  # (468,) in [0, 1], NaN = in no region (counted as seen); None: all seen
    width: int
    height: int
    focal_px: float
    focal_source: str


PosedFitter = Callable[[np.ndarray, np.ndarray, PoseFitTarget], PosedFaceResult | None]
"""(fused shape coefficients, fused vertices (V,3) mm, the face's landmarks and camera) -> the posed face,
or None when no landmark is visible."""

Keypoints = Callable[[np.ndarray], tuple[np.ndarray | None, np.ndarray]]
"""vertices (V,3) mm -> (68 landmarks or None, the 7 NoW points), both mm."""


@dataclass
class FusionSetup:
    """What the fusion service fuses in: a shape space, how to find keypoints on it, its default strategy.

    Each pack assembles its own (``flame_fusion_setup``, ``open_fusion_setup``), as it does its backends."""

    space: ShapeSpace | None
    status: BackendStatus
    keypoints: Keypoints | None = None
    default_strategy: str = ""
    uvs: np.ndarray | None = None
    """(V, 2) texture coordinates of the space's mesh, sent with every fused mesh when the topology has them."""
    posed_fitter: PosedFitter | None = None
    """Fits the fused face to the photo (expression, pose, camera; ``facefuse.packs.posed``); None: not offered."""


class UnavailableBackend:
    """Stands in a slot whose models are missing: says so in its status and refuses to pretend."""

    def __init__(self, service: str, message: str) -> None:
        self.status = BackendStatus(service=service, backend="none", pack="none", ready=False,
                                    placeholder=True, message=message)

    def _refuse(self, *_: object, **__: object) -> list[ShapeResult]:
        raise AssetError(f"{self.status.service} has no model: {self.status.message}")

    predict = _refuse
    sample = _refuse
    rank = _refuse


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; asking for a missing GPU is an AssetError."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise AssetError("--device cuda was asked for but torch sees no CUDA device (install a CUDA build of torch)")
    return name
