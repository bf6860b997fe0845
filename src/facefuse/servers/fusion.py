"""The fusion service: MICA's shape + OFER's samples and scores -> one fused shape, mesh and spread."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from facefuse import wire
from facefuse.errors import AssetError, InvalidInputError, LimitExceededError
from facefuse.packs.base import BackendStatus
from facefuse.servers.base import run_cli, unary_errors
from facefuse.servers.common import backend_info, check_visibility_values
from facefuse.servers.ofer import MAX_CANDIDATES
from facefuse.v1 import common_pb2, fusion_pb2, fusion_pb2_grpc

SERVICE_NAME = "facefuse.v1.FusionService"


Keypoints = Callable[[np.ndarray], tuple[np.ndarray | None, np.ndarray]]
"""vertices (V,3) mm -> (68 landmarks or None, the 7 NoW points), both mm."""


@dataclass
class FusionSetup:
    """What the fusion service fuses in: a shape space, how to find keypoints on it, its default strategy."""

    space: object | None
    status: BackendStatus
    keypoints: Keypoints | None = None
    default_strategy: str = ""


class FusionServicer(fusion_pb2_grpc.FusionServiceServicer):
    def __init__(self, setup: FusionSetup) -> None:
        self.space = setup.space
        self.status = setup.status
        self.keypoints = setup.keypoints
        self.default_strategy = setup.default_strategy

    @unary_errors
    def Fuse(self, request: fusion_pb2.FuseRequest, context: grpc.ServicerContext) -> fusion_pb2.FuseResponse:
        from facefuse.fusion.strategies import DEFAULT_STRATEGY, FusionInputs, fuse
        from facefuse.fusion.visibility import Visibility

        if self.space is None:
            raise AssetError(f"fusion has no shape space: {self.status.message}")
        k = self.space.num_coeffs  # type: ignore[attr-defined]
        mica = wire.require(request.mica_shape, "mica_shape", shape=(k,)) if wire.has(request, "mica_shape") else None
        samples = wire.require(request.samples, "samples", shape=(None, k)) if wire.has(request, "samples") else None
        scores = wire.require(request.scores, "scores", shape=(None,)) if wire.has(request, "scores") else None
        if samples is not None and len(samples) > MAX_CANDIDATES:
            raise LimitExceededError(f"{len(samples)} samples; the limit is {MAX_CANDIDATES}")
        if samples is not None and scores is not None and len(scores) != len(samples):
            raise InvalidInputError(f"scores has {len(scores)} entries for {len(samples)} samples")
        for key, value in request.options.items():
            if not math.isfinite(value):
                raise InvalidInputError(f"options[{key!r}]: {value} is not a finite number")
        visibility = None
        if request.HasField("visibility"):
            v = self.space.num_vertices  # type: ignore[attr-defined]
            per_vertex = (wire.require(request.visibility.per_vertex, "visibility.per_vertex", shape=(v,))
                          if wire.has(request.visibility, "per_vertex") else None)
            check_visibility_values(request.visibility, per_vertex)
            visibility = Visibility(regions=dict(request.visibility.regions), per_vertex=per_vertex,
                                    sources=tuple(request.visibility.sources))
        inputs = FusionInputs(mica_shape=None if mica is None else np.array(mica, np.float32),
                              samples=None if samples is None else np.array(samples, np.float32),
                              scores=None if scores is None else np.array(scores, np.float32),
                              visibility=visibility, options=dict(request.options))
        result = fuse(request.strategy or self.default_strategy or DEFAULT_STRATEGY, inputs, self.space)  # type: ignore[arg-type]
        reply = fusion_pb2.FuseResponse(
            shape=wire.from_numpy(result.shape.astype(np.float32)),
            mesh=wire.mesh_message(result.vertices_mm, self.space.faces, self.space.topology),  # type: ignore[attr-defined]
            vertex_spread=wire.from_numpy(result.vertex_spread_mm.astype(np.float32), unit="mm"),
            confidence=float(result.confidence), strategy=result.strategy)
        if self.keypoints is not None:
            lmk68, kpt7 = self.keypoints(result.vertices_mm)
            if lmk68 is not None:
                reply.landmarks68.CopyFrom(wire.from_numpy(lmk68.astype(np.float32), unit="mm"))
            reply.kpt7.CopyFrom(wire.from_numpy(kpt7.astype(np.float32), unit="mm"))
        uvs = getattr(self.space, "uvs", None)
        if uvs is not None:
            reply.mesh.uvs.CopyFrom(wire.from_numpy(np.asarray(uvs, np.float32)))
        return reply

    @unary_errors
    def ListStrategies(self, request: fusion_pb2.ListStrategiesRequest, context: grpc.ServicerContext) -> fusion_pb2.ListStrategiesResponse:
        from facefuse.fusion.strategies import DEFAULT_STRATEGY, strategy_names

        return fusion_pb2.ListStrategiesResponse(names=strategy_names(), default_strategy=self.default_strategy or DEFAULT_STRATEGY)

    @unary_errors
    def Info(self, request: common_pb2.InfoRequest, context: grpc.ServicerContext) -> common_pb2.BackendInfo:
        return backend_info(self.status)


def load_setup(pack: str, assets: str | None) -> FusionSetup:
    """The flame pack's FLAME shape space when its files are there (or asked for), else the open pack's."""
    from facefuse.assets.registry import asset_path, assets_dir

    directory = assets_dir(assets)
    has_flame = directory is not None and asset_path(directory, "flame2020").is_file()
    try:
        if pack == "flame" or (pack == "auto" and has_flame):
            if not has_flame:
                where = "no assets folder" if directory is None else f"{asset_path(directory, 'flame2020')} not found"
                return FusionSetup(None, BackendStatus("fusion", "none", "flame", False, True, f"flame pack: {where}"))
            return _flame_setup(directory)  # type: ignore[arg-type]
        return _open_setup()
    except AssetError as exc:
        return FusionSetup(None, BackendStatus("fusion", "none", pack, False, True, str(exc)))


def _flame_setup(directory: Path) -> FusionSetup:
    from facefuse.assets.flame_file import load_flame_masks
    from facefuse.assets.registry import asset_path
    from facefuse.fusion.space import ShapeSpace
    from facefuse.fusion.strategies import DEFAULT_STRATEGY
    from facefuse.models.flame import NOW7_FROM_LMK68
    from facefuse.packs.flame import landmark_function, load_flame

    flame = load_flame(directory)
    masks_path = asset_path(directory, "flame_masks")
    regions = load_flame_masks(masks_path, num_vertices=flame.num_vertices) if masks_path.is_file() else {}
    space = ShapeSpace.from_flame(flame, regions)
    landmarks = landmark_function(flame)

    def keypoints(vertices_mm: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        lmk68 = landmarks(vertices_mm)
        return lmk68, lmk68[list(NOW7_FROM_LMK68)]

    details = {"regions": ",".join(sorted(space.regions)) or "none (region strategy unavailable)"}
    return FusionSetup(space, BackendStatus("fusion", "flame2020-linear", "flame", True, False, "ready", details=details),
                       keypoints, DEFAULT_STRATEGY)


def _open_setup() -> FusionSetup:
    from facefuse.assets.canonical_face import load_canonical_face
    from facefuse.packs.open import OPEN_DEFAULT_STRATEGY, kpt7, open_shape_space

    canonical = load_canonical_face()
    space = open_shape_space(canonical=canonical)
    space.uvs = canonical.uvs  # type: ignore[attr-defined]
    return FusionSetup(space, BackendStatus("fusion", "mediapipe468-identity", "open", True, False, "ready",
                                            details={"regions": ",".join(sorted(space.regions))}),
                       lambda vertices: (None, kpt7(vertices)), OPEN_DEFAULT_STRATEGY)


def build(args: argparse.Namespace) -> tuple[Callable[[grpc.Server], None], Sequence[str], dict[str, bool]]:
    setup = load_setup(args.pack, args.assets)
    servicer = FusionServicer(setup)
    return (lambda server: fusion_pb2_grpc.add_FusionServiceServicer_to_server(servicer, server),
            [SERVICE_NAME], {SERVICE_NAME: setup.status.ready})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--assets", help="folder with the official files (FLAME, masks); default $FACEFUSE_ASSETS")
    parser.add_argument("--pack", default="auto", choices=["auto", "flame", "open"], help="model pack")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("facefuse-fusion", "fusion service: MICA and OFER fused in FLAME space", add_arguments, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
