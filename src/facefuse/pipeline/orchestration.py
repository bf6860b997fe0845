"""What the gateway runs for each image: decode, detect, align, then the method's branches per face.

Branch calls go to the model services through ``MeshClients``, each bounded by the caller's deadline.
A face whose branch fails gets its own status (or a documented fallback, flagged in the result); the
other faces and images go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from facefuse import wire
from facefuse.errors import FacefuseError, InvalidInputError
from facefuse.face.frontend import select_faces
from facefuse.face.types import AlignedFace, Detection
from facefuse.io.images import decode_image
from facefuse.servers.base import channel_options, error_from_rpc, status_code_for
from facefuse.v1 import common_pb2, fusion_pb2, fusion_pb2_grpc, gateway_pb2, mica_pb2, mica_pb2_grpc, ofer_pb2, ofer_pb2_grpc

METHODS = ("detect", "mica", "ofer", "fuse")
DEFAULT_CALL_TIMEOUT_S = 600.0
# Strategies that need MICA's shape before the generative branch runs (it steers the sampler or ranker).
SEQUENTIAL_STRATEGIES = ("pool", "sdedit", "guided")


@dataclass
class MeshClients:
    """Stubs of the model services (any may be None when not configured)."""

    mica: mica_pb2_grpc.MicaServiceStub | None
    ofer: ofer_pb2_grpc.OferServiceStub | None
    fusion: fusion_pb2_grpc.FusionServiceStub | None
    channels: tuple[grpc.Channel, ...] = ()

    @classmethod
    def connect(cls, mica: str | None, ofer: str | None, fusion: str | None, max_message_mb: int = 64) -> "MeshClients":
        opts = channel_options(max_message_mb)
        channels: list[grpc.Channel] = []

        def stub(address: str | None, factory: Callable[[grpc.Channel], object]) -> object | None:
            if not address:
                return None
            channel = grpc.insecure_channel(address, options=opts)
            channels.append(channel)
            return factory(channel)

        return cls(stub(mica, mica_pb2_grpc.MicaServiceStub), stub(ofer, ofer_pb2_grpc.OferServiceStub),  # type: ignore[arg-type]
                   stub(fusion, fusion_pb2_grpc.FusionServiceStub), tuple(channels))  # type: ignore[arg-type]

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def match_given_boxes(detections: list[Detection], boxes: list[common_pb2.Box]) -> list[Detection | None]:
    """For each given box (e.g. NoW's), the detection overlapping it most (IoU >= 0.3), else None."""
    matched: list[Detection | None] = []
    for box in boxes:
        given = np.array([box.x1, box.y1, box.x2, box.y2], np.float32)
        best, best_iou = None, 0.3
        for det in detections:
            iou = _iou(given, det.box)
            if iou >= best_iou:
                best, best_iou = det, iou
        matched.append(best)
    return matched


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def status(code: grpc.StatusCode, message: str = "") -> common_pb2.Status:
    return common_pb2.Status(code=code.value[0], message=message)


def error_result(image_id: str, exc: BaseException, face_index: int = -1, num_faces: int = 0) -> gateway_pb2.FaceResult:
    code = status_code_for(exc) if isinstance(exc, (FacefuseError, TimeoutError)) else grpc.StatusCode.INTERNAL
    return gateway_pb2.FaceResult(image_id=image_id, face_index=face_index, num_faces=num_faces,
                                  status=status(code, str(exc)))


class FacePipeline:
    """Per-image work of the gateway, independent of the transport that feeds it."""

    def __init__(self, front_end: object, clients: MeshClients, *, max_pixels: int = 40_000_000,
                 face_workers: int = 4) -> None:
        self.front_end = front_end
        self.clients = clients
        self.max_pixels = max_pixels
        self._faces_pool = ThreadPoolExecutor(max_workers=face_workers, thread_name_prefix="face")

    def close(self) -> None:
        self._faces_pool.shutdown(wait=False, cancel_futures=True)

    def process_image(self, image_id: str, data: bytes, options: gateway_pb2.ProcessOptions,
                      mask: np.ndarray | None = None, deadline: float | None = None) -> Iterator[gateway_pb2.FaceResult]:
        """Results for one image, one per face as soon as each is ready; errors become results."""
        started = time.monotonic()
        try:
            method = options.method or "detect"
            if method not in METHODS:
                raise InvalidInputError(f"method {method!r}; expected one of {METHODS}")
            image = decode_image(data, max_pixels=self.max_pixels)
            faces = self._faces(image, options)
        except FacefuseError as exc:
            yield error_result(image_id, exc)
            return
        except Exception as exc:  # noqa: BLE001 - one bad image never ends the stream
            yield error_result(image_id, exc)
            return
        if not faces:
            yield gateway_pb2.FaceResult(image_id=image_id, face_index=-1, num_faces=0,
                                         status=status(grpc.StatusCode.NOT_FOUND, "no face found"))
            return
        num = len(faces)
        hw = (int(image.shape[0]), int(image.shape[1]))
        futures: list[Future[gateway_pb2.FaceResult]] = []
        for index, item in enumerate(faces):
            if isinstance(item, FacefuseError):
                futures.append(_done(error_result(image_id, item, index, num)))
                continue
            futures.append(self._faces_pool.submit(self._face_result, image_id, index, num, item, hw, options, mask, deadline))
        for future in _as_completed_in_time(futures):
            result = future.result()
            result.seconds = time.monotonic() - started
            yield result

    def _faces(self, image: np.ndarray, options: gateway_pb2.ProcessOptions) -> list[AlignedFace | FacefuseError]:
        detections = self.front_end.detect(image)  # type: ignore[attr-defined]
        hw = (int(image.shape[0]), int(image.shape[1]))
        chosen: list[Detection | None]
        if options.boxes:
            chosen = match_given_boxes(detections, list(options.boxes))
        else:
            chosen = list(select_faces(detections, image.shape, options.selection or "all"))
        out: list[AlignedFace | FacefuseError] = []
        for det in chosen:
            if det is None:
                out.append(InvalidInputError("no detection matches the given box"))
                continue
            out.append(self.front_end.align(image, det))  # type: ignore[attr-defined]
        return out

    def _face_result(self, image_id: str, index: int, num: int, face: AlignedFace, hw: tuple[int, int],
                     options: gateway_pb2.ProcessOptions, mask: np.ndarray | None,
                     deadline: float | None) -> gateway_pb2.FaceResult:
        method = options.method or "detect"
        needs_farl = method in ("ofer", "fuse")
        if needs_farl and face.farl_input is None:
            from facefuse.face.farl_preprocess import farl_preprocess

            face.farl_input = farl_preprocess(np.clip(face.crop_box224 * 255.0 + 0.5, 0, 255).astype(np.uint8))
        face_msg = wire.face_message(face, index, hw, with_crops=True)
        result = gateway_pb2.FaceResult(image_id=image_id, face_index=index, num_faces=num,
                                        status=status(grpc.StatusCode.OK))
        result.face.CopyFrom(face_msg if options.return_crops or method == "detect" else _without_crops(face_msg))
        try:
            if method == "mica":
                result.reconstruction.CopyFrom(self._mica(face_msg, deadline))
            elif method == "ofer":
                result.reconstruction.CopyFrom(self._ofer(face_msg, options, deadline, None))
            elif method == "fuse":
                self._fuse(face_msg, options, deadline, result)
        except FacefuseError as exc:
            code = status_code_for(exc)
            result.status.CopyFrom(status(code, str(exc)))
        return result

    # -- branches --------------------------------------------------------------------------------

    def _timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return DEFAULT_CALL_TIMEOUT_S
        left = deadline - time.monotonic()
        if left <= 0:
            from facefuse.servers.base import DeadlineError

            raise DeadlineError("deadline exceeded before the branch could run")
        return min(left, DEFAULT_CALL_TIMEOUT_S)

    def _call(self, backend: str, fn: Callable[..., object], request: object, deadline: float | None) -> object:
        if fn is None:
            from facefuse.errors import BackendUnavailableError

            raise BackendUnavailableError(f"{backend} service is not configured on this gateway")
        try:
            return fn(request, timeout=self._timeout(deadline))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"{backend} service") from None

    def _mica(self, face: common_pb2.Face, deadline: float | None) -> gateway_pb2.Reconstruction:
        stub = self.clients.mica
        reply = self._call("mica", stub.Predict if stub else None,
                           mica_pb2.PredictRequest(faces=[face], return_mesh=True, return_landmarks=True), deadline)
        pred = reply.predictions[0]  # type: ignore[attr-defined]
        return gateway_pb2.Reconstruction(method="mica", shape=pred.shape, mesh=pred.mesh,
                                          landmarks68=pred.landmarks68, kpt7=pred.kpt7)

    def _samples(self, face: common_pb2.Face, options: gateway_pb2.ProcessOptions, deadline: float | None,
                 start: common_pb2.Tensor | None = None, t0: int = 0,
                 guide: common_pb2.Tensor | None = None, strength: float = 0.0) -> np.ndarray:
        stub = self.clients.ofer
        request = ofer_pb2.SampleRequest(face=face, num_samples=options.num_samples or 10, steps=options.steps,
                                         mode=options.sampler_mode or "fast", seed=options.seed)
        if start is not None:
            request.start_shape.CopyFrom(start)
            request.start_t0 = t0
        if guide is not None:
            request.guide_shape.CopyFrom(guide)
            request.guide_strength = strength
        if stub is None:
            self._call("ofer", None, request, deadline)
        chunks = []
        try:
            for chunk in stub.Sample(request, timeout=self._timeout(deadline)):  # type: ignore[union-attr]
                chunks.append(wire.to_numpy(chunk.shapes, "shapes"))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, "ofer service") from None
        return np.concatenate(chunks, axis=0) if chunks else np.zeros((0, 300), np.float32)

    def _rank(self, face: common_pb2.Face, candidates: np.ndarray, deadline: float | None) -> np.ndarray:
        stub = self.clients.ofer
        reply = self._call("ofer", stub.Rank if stub else None,
                           ofer_pb2.RankRequest(face=face, candidates=wire.from_numpy(candidates.astype(np.float32))), deadline)
        return np.array(wire.to_numpy(reply.scores, "scores"))  # type: ignore[attr-defined]

    def _fusion(self, request: fusion_pb2.FuseRequest, deadline: float | None) -> fusion_pb2.FuseResponse:
        stub = self.clients.fusion
        return self._call("fusion", stub.Fuse if stub else None, request, deadline)  # type: ignore[return-value]

    def _ofer(self, face: common_pb2.Face, options: gateway_pb2.ProcessOptions, deadline: float | None,
              _unused: object) -> gateway_pb2.Reconstruction:
        samples = self._samples(face, options, deadline)
        scores = self._rank(face, samples, deadline)
        fused = self._fusion(fusion_pb2.FuseRequest(strategy="ofer", samples=wire.from_numpy(samples),
                                                    scores=wire.from_numpy(scores.astype(np.float32))), deadline)
        return gateway_pb2.Reconstruction(method="ofer", strategy="ofer", shape=fused.shape, mesh=fused.mesh,
                                          vertex_spread=fused.vertex_spread, confidence=fused.confidence,
                                          samples=wire.from_numpy(samples), sample_scores=wire.from_numpy(scores.astype(np.float32)))

    def _fuse(self, face: common_pb2.Face, options: gateway_pb2.ProcessOptions, deadline: float | None,
              result: gateway_pb2.FaceResult) -> None:
        from facefuse.errors import BackendUnavailableError

        strategy = options.strategy or "linear"
        mica = self._mica(face, deadline)
        mica_shape = mica.shape
        try:
            if strategy == "sdedit":
                t0 = int(options.strategy_options.get("t0", 300))
                samples = self._samples(face, options, deadline, start=mica_shape, t0=t0)
            elif strategy == "guided":
                samples = self._samples(face, options, deadline, guide=mica_shape,
                                        strength=float(options.strategy_options.get("strength", 0.5)))
            else:
                samples = self._samples(face, options, deadline)
            candidates = samples
            if strategy == "pool":
                candidates = np.concatenate([samples, wire.to_numpy(mica_shape)[None].astype(np.float32)], axis=0)
            scores = self._rank(face, candidates, deadline)
        except BackendUnavailableError as exc:
            # Documented fallback: the generative branch is down, the face still gets MICA's shape, flagged.
            mica.fallback = f"ofer unavailable, fell back to mica: {exc}"
            mica.strategy = "mica"
            result.reconstruction.CopyFrom(mica)
            result.branches.add(name="mica", reconstruction=mica)
            return
        request = fusion_pb2.FuseRequest(strategy=strategy, options=dict(options.strategy_options), mica_shape=mica_shape,
                                         samples=wire.from_numpy(candidates), scores=wire.from_numpy(scores.astype(np.float32)))
        fused = self._fusion(request, deadline)
        result.reconstruction.CopyFrom(gateway_pb2.Reconstruction(
            method="fuse", strategy=fused.strategy, shape=fused.shape, mesh=fused.mesh, landmarks68=mica.landmarks68,
            kpt7=mica.kpt7, vertex_spread=fused.vertex_spread, confidence=fused.confidence,
            samples=wire.from_numpy(candidates), sample_scores=wire.from_numpy(scores.astype(np.float32))))
        if options.save_branches:
            result.branches.add(name="mica", reconstruction=mica)


def _without_crops(face: common_pb2.Face) -> common_pb2.Face:
    slim = common_pb2.Face()
    slim.CopyFrom(face)
    for name in ("crop112", "arcface_blob", "crop224", "crop_box224", "farl_input"):
        slim.ClearField(name)
    return slim


def _done(value: gateway_pb2.FaceResult) -> Future[gateway_pb2.FaceResult]:
    future: Future[gateway_pb2.FaceResult] = Future()
    future.set_result(value)
    return future


def _as_completed_in_time(futures: list[Future[gateway_pb2.FaceResult]]) -> Iterator[Future[gateway_pb2.FaceResult]]:
    from concurrent.futures import as_completed

    yield from as_completed(futures)
