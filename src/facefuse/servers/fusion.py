"""The fusion service: MICA's shape + OFER's samples and scores -> one fused shape, mesh and spread."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import grpc
import numpy as np

from facefuse import wire
from facefuse.errors import AssetError, InvalidInputError, LimitExceededError
from facefuse.fusion.profile import PROFILE_ENV, FusionProfile, read_profile
from facefuse.fusion.strategies import FusionStrategy
from facefuse.packs.base import FusionSetup
from facefuse.rpc.logs import log_event
from facefuse.servers.base import run_cli
from facefuse.servers.common import backend_info, visibility_from_message
from facefuse.servers.ofer import MAX_CANDIDATES
from facefuse.servers.threads import add_thread_argument
from facefuse.v1 import common_pb2, fusion_pb2, fusion_pb2_grpc

if TYPE_CHECKING:
    from facefuse.fusion.visibility import Visibility
    from facefuse.packs.posed import PosedFaceResult, PoseFitTarget

SERVICE_NAME = "facefuse.v1.FusionService"


class FusionServicer(fusion_pb2_grpc.FusionServiceServicer):
    def __init__(self, setup: FusionSetup, profile: FusionProfile | None = None) -> None:
        self.space = setup.space
        self.status = setup.status
        self.keypoints = setup.keypoints
        self.default_strategy = setup.default_strategy
        self.uvs = setup.uvs
        self.posed_fitter = setup.posed_fitter
        # A tuned profile: its strategy becomes the default, with its options as that strategy's defaults
        # (a request's own options still override them).
        self.tuned: dict[str, FusionStrategy] = {}
        if profile is not None:
            self.default_strategy = profile.strategy
            self.tuned[profile.strategy] = profile.create()
            self.status = dataclasses.replace(self.status, details={**self.status.details, **profile.info_details()})

    def Fuse(self, request: fusion_pb2.FuseRequest, context: grpc.ServicerContext) -> fusion_pb2.FuseResponse:
        from facefuse.fusion.strategies import DEFAULT_STRATEGY, FusionInputs, fuse

        if self.space is None:
            raise AssetError(f"fusion has no shape space: {self.status.message}")
        k = self.space.num_coeffs
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
        visibility = (visibility_from_message(request.visibility, self.space.num_vertices)
                      if request.HasField("visibility") else None)
        inputs = FusionInputs(mica_shape=None if mica is None else np.array(mica, np.float32),
                              samples=None if samples is None else np.array(samples, np.float32),
                              scores=None if scores is None else np.array(scores, np.float32),
                              visibility=visibility, options=dict(request.options))
        name = request.strategy or self.default_strategy or DEFAULT_STRATEGY
        tuned = self.tuned.get(name)
        result = tuned(inputs, self.space) if tuned is not None else fuse(name, inputs, self.space)
        reply = fusion_pb2.FuseResponse(
            shape=wire.from_numpy(result.shape.astype(np.float32)),
            mesh=wire.mesh_message(result.vertices_mm, self.space.faces, self.space.topology),
            vertex_spread=wire.from_numpy(result.vertex_spread_mm.astype(np.float32), unit="mm"),
            confidence=float(result.confidence), strategy=result.strategy)
        if self.keypoints is not None:
            lmk68, kpt7 = self.keypoints(result.vertices_mm)
            if lmk68 is not None:
                reply.landmarks68.CopyFrom(wire.from_numpy(lmk68.astype(np.float32), unit="mm"))
            reply.kpt7.CopyFrom(wire.from_numpy(kpt7.astype(np.float32), unit="mm"))
        if self.uvs is not None:
            reply.mesh.uvs.CopyFrom(wire.from_numpy(np.asarray(self.uvs, np.float32)))
        if request.HasField("pose_fit"):
            target = pose_fit_target(request.pose_fit, visibility)
            if self.posed_fitter is None:
                log_event("posed_fit_unavailable", pack=self.status.pack)
            else:
                posed = self.posed_fitter(np.asarray(result.shape, np.float64), np.asarray(result.vertices_mm), target)
                if posed is None:
                    log_event("posed_fit_skipped", reason="no visible landmark")
                else:
                    reply.posed.CopyFrom(posed_face_message(posed))
        return reply

    def ListStrategies(
        self, request: fusion_pb2.ListStrategiesRequest, context: grpc.ServicerContext
    ) -> fusion_pb2.ListStrategiesResponse:
        from facefuse.fusion.strategies import DEFAULT_STRATEGY, strategy_names

        return fusion_pb2.ListStrategiesResponse(
            names=strategy_names(), default_strategy=self.default_strategy or DEFAULT_STRATEGY
        )

    def Info(self, request: common_pb2.InfoRequest, context: grpc.ServicerContext) -> common_pb2.BackendInfo:
        return backend_info(self.status)


MAX_IMAGE_SIDE = 100_000
MAX_FOCAL_PX = 1e7
POSE_FIT_POINTS = (468, 478)
"""FaceMesh's 468 points, optionally followed by the 10 iris points."""


def pose_fit_target(message: common_pb2.PoseFitInput, visibility: Visibility | None) -> PoseFitTarget:
    """The request's ``pose_fit``, checked (INVALID_ARGUMENT on anything off), as a ``PoseFitTarget``.

    Per-landmark visibility: the request's per-vertex values when they are per FaceMesh point, else the
    regions' values at each point (``landmark_visibility``), else every point seen."""
    from facefuse.fusion.visibility import landmark_visibility
    from facefuse.packs.posed import FOCAL_SOURCES, PoseFitTarget

    if not wire.has(message, "landmarks"):
        raise InvalidInputError("pose_fit.landmarks: missing (the face's 468 FaceMesh points)")
    landmarks = wire.require(message.landmarks, "pose_fit.landmarks", shape=(None, 3))
    if len(landmarks) not in POSE_FIT_POINTS:
        raise InvalidInputError(f"pose_fit.landmarks: {len(landmarks)} points; expected one of {POSE_FIT_POINTS}")
    if float(np.abs(landmarks).max()) > 10 * MAX_IMAGE_SIDE:
        raise InvalidInputError("pose_fit.landmarks: coordinates far outside any image")
    if not wire.has(message, "image_size"):
        raise InvalidInputError("pose_fit.image_size: missing (width, height)")
    size = wire.require(message.image_size, "pose_fit.image_size", shape=(2,),
                        dtypes=(common_pb2.INT32, common_pb2.INT64))
    width, height = int(size[0]), int(size[1])
    if not (0 < width <= MAX_IMAGE_SIDE and 0 < height <= MAX_IMAGE_SIDE):
        raise InvalidInputError(f"pose_fit.image_size: {width}x{height}; expected 1..{MAX_IMAGE_SIDE} per side")
    focal = float(message.focal_px)
    if not (math.isfinite(focal) and 0.0 < focal <= MAX_FOCAL_PX):
        raise InvalidInputError(f"pose_fit.focal_px: {message.focal_px}; expected a number in (0, {MAX_FOCAL_PX:g}]")
    if message.focal_source not in FOCAL_SOURCES:
        raise InvalidInputError(f"pose_fit.focal_source: {message.focal_source!r}; expected one of {FOCAL_SOURCES}")
    per_point = None
    if visibility is not None:
        if visibility.per_vertex is not None and len(visibility.per_vertex) == 468:
            per_point = np.asarray(visibility.per_vertex, np.float64)
        elif visibility.regions:
            per_point = landmark_visibility(np.asarray(landmarks[:468], np.float64), visibility.regions)
    return PoseFitTarget(np.array(landmarks, np.float64), per_point, width, height, focal, message.focal_source)


def posed_face_message(posed: PosedFaceResult) -> common_pb2.PosedFace:
    return common_pb2.PosedFace(
        expression=wire.from_numpy(posed.expression.astype(np.float32)),
        jaw_pose=wire.from_numpy(posed.jaw_pose.astype(np.float32), unit="rad"),
        global_pose=wire.from_numpy(posed.global_pose.astype(np.float32), unit="rad"),
        translation=wire.from_numpy(posed.translation.astype(np.float32), unit="mm"),
        camera_intrinsics=wire.from_numpy(posed.camera_intrinsics.astype(np.float32), unit="px"),
        camera_extrinsics=wire.from_numpy(posed.camera_extrinsics.astype(np.float32)),
        image_size=wire.from_numpy(posed.image_size.astype(np.int32), unit="px"),
        focal_source=posed.focal_source, reprojection_error_px=float(posed.reprojection_error_px),
        vertices=wire.from_numpy(posed.vertices_mm.astype(np.float32), unit="mm"),
        landmarks_px=wire.from_numpy(posed.landmarks_px.astype(np.float32), unit="px"))


def build(args: argparse.Namespace) -> tuple[Callable[[grpc.Server], None], Sequence[str], dict[str, bool]]:
    from facefuse.packs.loading import load_fusion_setup

    profile = read_profile(args.fusion_profile) if args.fusion_profile else None
    setup = load_fusion_setup(args.pack, args.assets)
    servicer = FusionServicer(setup, profile)
    return (lambda server: fusion_pb2_grpc.add_FusionServiceServicer_to_server(servicer, server),
            [SERVICE_NAME], {SERVICE_NAME: setup.status.ready})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--assets", help="folder with the official files (FLAME, masks); default $FACEFUSE_ASSETS")
    parser.add_argument("--pack", default="auto", choices=["auto", "flame", "open"], help="model pack")
    parser.add_argument("--fusion-profile", default=os.environ.get(PROFILE_ENV) or None, metavar="PATH",
                        help="fusion profile from `facefuse bench now --tune`: its strategy and options become the "
                             f"default (default ${PROFILE_ENV})")
    add_thread_argument(parser)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("facefuse-fusion", "fusion service: MICA and OFER fused in FLAME space", add_arguments, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
