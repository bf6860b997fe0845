"""The fusion service: MICA's shape + OFER's samples and scores -> one fused shape, mesh and spread."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import numpy as np

from facefuse import wire
from facefuse.errors import AssetError, InvalidInputError
from facefuse.packs.base import BackendStatus
from facefuse.servers.base import run_cli, unary_errors
from facefuse.servers.common import backend_info
from facefuse.v1 import common_pb2, fusion_pb2, fusion_pb2_grpc

SERVICE_NAME = "facefuse.v1.FusionService"


class FusionServicer(fusion_pb2_grpc.FusionServiceServicer):
    def __init__(self, space: object | None, status: BackendStatus, landmarks: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.space = space
        self.status = status
        self.landmarks = landmarks

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
        if samples is not None and scores is not None and len(scores) != len(samples):
            raise InvalidInputError(f"scores has {len(scores)} entries for {len(samples)} samples")
        visibility = None
        if request.HasField("visibility"):
            per_vertex = wire.to_numpy(request.visibility.per_vertex) if wire.has(request.visibility, "per_vertex") else None
            visibility = Visibility(regions=dict(request.visibility.regions), per_vertex=per_vertex,
                                    sources=tuple(request.visibility.sources))
        inputs = FusionInputs(mica_shape=None if mica is None else np.array(mica, np.float32),
                              samples=None if samples is None else np.array(samples, np.float32),
                              scores=None if scores is None else np.array(scores, np.float32),
                              visibility=visibility, options=dict(request.options))
        result = fuse(request.strategy or DEFAULT_STRATEGY, inputs, self.space)  # type: ignore[arg-type]
        reply = fusion_pb2.FuseResponse(
            shape=wire.from_numpy(result.shape.astype(np.float32)),
            mesh=wire.mesh_message(result.vertices_mm, self.space.faces, self.space.topology),  # type: ignore[attr-defined]
            vertex_spread=wire.from_numpy(result.vertex_spread_mm.astype(np.float32), unit="mm"),
            confidence=float(result.confidence), strategy=result.strategy)
        if self.landmarks is not None:
            lmk68 = self.landmarks(result.vertices_mm)
            reply.landmarks68.CopyFrom(wire.from_numpy(lmk68.astype(np.float32), unit="mm"))
            from facefuse.models.flame import NOW7_FROM_LMK68

            reply.kpt7.CopyFrom(wire.from_numpy(lmk68[list(NOW7_FROM_LMK68)].astype(np.float32), unit="mm"))
        return reply

    @unary_errors
    def ListStrategies(self, request: fusion_pb2.ListStrategiesRequest, context: grpc.ServicerContext) -> fusion_pb2.ListStrategiesResponse:
        from facefuse.fusion.strategies import DEFAULT_STRATEGY, strategy_names

        return fusion_pb2.ListStrategiesResponse(names=strategy_names(), default_strategy=DEFAULT_STRATEGY)

    @unary_errors
    def Info(self, request: common_pb2.InfoRequest, context: grpc.ServicerContext) -> common_pb2.BackendInfo:
        return backend_info(self.status)


def load_space(assets: str | None) -> tuple[object | None, BackendStatus, Callable[[np.ndarray], np.ndarray] | None]:
    """The FLAME shape space (and its landmark function) from the user's files, or why there is none."""
    from facefuse.assets.registry import asset_path, assets_dir

    directory = assets_dir(assets)
    if directory is None or not asset_path(directory, "flame2020").is_file():
        where = "no assets folder" if directory is None else f"{asset_path(directory, 'flame2020')} not found"
        return None, BackendStatus("fusion", "none", "none", False, True, f"flame pack: {where}"), None
    try:
        from facefuse.assets.flame_file import load_flame_masks, load_flame_model, load_landmark_embedding
        from facefuse.fusion.space import ShapeSpace
        from facefuse.packs.flame import landmark_function

        flame = load_flame_model(asset_path(directory, "flame2020"))
        masks_path = asset_path(directory, "flame_masks")
        regions = load_flame_masks(masks_path) if masks_path.is_file() else {}
        space = ShapeSpace.from_flame(flame, regions)
        lmk_path = asset_path(directory, "landmark_embedding")
        landmarks = landmark_function(flame, load_landmark_embedding(lmk_path)) if Path(lmk_path).is_file() else None
    except AssetError as exc:
        return None, BackendStatus("fusion", "none", "flame", False, True, str(exc)), None
    details = {"regions": ",".join(sorted(regions)) or "none (region strategy unavailable)"}
    return space, BackendStatus("fusion", "flame2020-linear", "flame", True, False, "ready", details=details), landmarks


def build(args: argparse.Namespace) -> tuple[Callable[[grpc.Server], None], Sequence[str], dict[str, bool]]:
    space, status, landmarks = load_space(args.assets)
    servicer = FusionServicer(space, status, landmarks)
    return (lambda server: fusion_pb2_grpc.add_FusionServiceServicer_to_server(servicer, server),
            [SERVICE_NAME], {SERVICE_NAME: status.ready})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--assets", help="folder with the official files (FLAME, masks); default $FACEFUSE_ASSETS")
    parser.add_argument("--pack", default="auto", choices=["auto", "flame", "open"], help="model pack")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("facefuse-fusion", "fusion service: MICA and OFER fused in FLAME space", add_arguments, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
