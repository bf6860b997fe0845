"""What the gateway runs for each image: decode, detect, align, then the method's branches per face.

Branch calls go to the model services through ``MeshClients``, each bounded by the caller's deadline.
A face whose branch fails gets its own status (or a documented fallback, flagged in the result); the
other faces and images go on.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
import numpy as np

from facefuse import wire
from facefuse.errors import (
    BackendError,
    BackendUnavailableError,
    FacefuseError,
    InvalidInputError,
    LimitExceededError,
)
from facefuse.face.frontend import SELECTIONS, select_faces
from facefuse.face.types import AlignedFace, Detection, check_det_thresh
from facefuse.io.images import DEFAULT_MAX_DECODE_BYTES, decode_image, exif_focal_35mm
from facefuse.models.focal import DEFAULT_FOCAL_35MM, focal_px_from_35mm
from facefuse.packs.base import SCALE_SOURCES
from facefuse.rpc.deadline import Deadline
from facefuse.rpc.interceptors import request_metadata
from facefuse.rpc.logs import LOG, log_event
from facefuse.rpc.metrics import count_face, observe_decode_bytes
from facefuse.rpc.options import backend_channel_options, backend_target
from facefuse.rpc.security import ClientTls, secure_or_insecure_channel
from facefuse.rpc.status import error_from_rpc, is_backend_down, status_code_for
from facefuse.v1 import (
    common_pb2,
    fusion_pb2,
    fusion_pb2_grpc,
    gateway_pb2,
    mica_pb2,
    mica_pb2_grpc,
    ofer_pb2,
    ofer_pb2_grpc,
)

if TYPE_CHECKING:
    from facefuse.assets.canonical_face import CanonicalFace
    from facefuse.face.hands import HandDetector


class FrontEnd(Protocol):
    """What the pipeline needs of a face front end (``facefuse.face.frontend.FaceFrontEnd`` or a test
    double); one that also has ``estimate_iris`` gives the open pack its metric scale."""

    def detect(self, image: np.ndarray, det_thresh: float | None = None) -> list[Detection]: ...
    # ``det_thresh`` is passed only when a request sets ProcessOptions.det_thresh (doubles may omit it).

    def align(self, image: np.ndarray, detection: Detection) -> AlignedFace: ...

METHODS = ("detect", "mica", "ofer", "fuse")
CROP_FIELDS = ("crop112", "arcface_blob", "crop224", "crop_box224", "farl_input")
"""The Face message's image tensors (~1.5 MB together); each backend call carries only those it reads."""
MICA_CROPS = ("arcface_blob",)
"""MICA (flame pack) reads only its ArcFace blob (147 KB)."""
OPEN_MICA_CROPS = ("arcface_blob", "crop_box224")
"""The open pack's mica reads the landmarks and mirror-averages FaceMesh on the box crop (docs/open-pack.md);
every aligned face carries its ArcFace blob (facefuse.wire checks it)."""
ANY_MICA_CROPS = ("arcface_blob", "crop_box224")
"""While the mica service's pack is unknown: what either pack may read."""
SAMPLE_CROPS = ("arcface_blob", "farl_input")
"""IdGen (flame pack) reads the ArcFace blob; the FaRL input (602 KB) lets the ofer service compute the face's
IdRank context while it samples (docs/performance.md#rank-prefetch), since Rank follows every Sample here."""
RANK_CROPS = ("arcface_blob", "farl_input")
"""IdRank (flame pack) reads the ArcFace blob and the FaRL input."""
OPEN_OFER_CROPS = ("arcface_blob", "crop_box224")
"""The open pack's Sample and Rank impute hidden landmarks from the box crop's pixels."""
ANY_OFER_CROPS = ("arcface_blob", "crop_box224", "farl_input")
"""While the ofer service's pack is unknown: what either pack may read."""
DEFAULT_CALL_TIMEOUT_S = 600.0
VISIBILITY_SOURCES = ("mask", "photometric", "hands", "pose")
MAX_GIVEN_BOXES = 64


@dataclass
class MeshClients:
    """Stubs of the model services (any may be None when not configured)."""

    mica: mica_pb2_grpc.MicaServiceStub | None
    ofer: ofer_pb2_grpc.OferServiceStub | None
    fusion: fusion_pb2_grpc.FusionServiceStub | None
    channels: tuple[grpc.Channel, ...] = ()
    by_backend: dict[str, grpc.Channel] = field(default_factory=dict)
    """Backend name (mica, ofer, fusion) -> its channel, for the gateway's readiness check."""

    @classmethod
    def connect(cls, mica: str | None, ofer: str | None, fusion: str | None, max_message_mb: int = 64, *,
                tls: ClientTls | None = None, tls_name: str | None = None) -> MeshClients:
        """Channels to the model services. An address may name several replicas (``dns:///ofer:50052`` or
        ``ip:port,ip:port``): calls are spread round robin and idempotent ones retried on another replica
        when one goes away (``rpc.options.backend_service_config``); ``tls`` makes them (mutual) TLS."""
        opts = backend_channel_options(max_message_mb, tls_name)
        channels: dict[str, grpc.Channel] = {}

        for name, address in (("mica", mica), ("ofer", ofer), ("fusion", fusion)):
            if not address:
                continue
            try:
                target = backend_target(address)
            except ValueError as exc:
                raise InvalidInputError(str(exc)) from None
            channels[name] = secure_or_insecure_channel(target, opts, tls)
        mica_channel, ofer_channel, fusion_channel = (channels.get(n) for n in ("mica", "ofer", "fusion"))
        return cls(None if mica_channel is None else mica_pb2_grpc.MicaServiceStub(mica_channel),
                   None if ofer_channel is None else ofer_pb2_grpc.OferServiceStub(ofer_channel),
                   None if fusion_channel is None else fusion_pb2_grpc.FusionServiceStub(fusion_channel),
                   tuple(channels.values()), channels)

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
    """A result carrying ``exc``'s status; an exception that is not a facefuse error is our bug: INTERNAL, logged."""
    code = status_code_for(exc) if isinstance(exc, (FacefuseError, TimeoutError)) else grpc.StatusCode.INTERNAL
    if not isinstance(exc, (FacefuseError, TimeoutError)):
        LOG.error("internal error on image %r face %d", image_id, face_index, exc_info=exc)
    return gateway_pb2.FaceResult(image_id=image_id, face_index=face_index, num_faces=num_faces,
                                  status=status(code, str(exc)))


def check_options(options: gateway_pb2.ProcessOptions) -> None:
    """Refuse ProcessOptions a caller got wrong before any work (INVALID_ARGUMENT, RESOURCE_EXHAUSTED for
    limits). Upper limits of the model services (num_samples, steps, sampler_mode) stay theirs: their
    INVALID_ARGUMENT/RESOURCE_EXHAUSTED reaches the face unchanged."""
    from facefuse.fusion.strategies import NUM_TRAIN_STEPS, strategy_names

    if (options.method or "detect") not in METHODS:
        raise InvalidInputError(f"method {options.method!r}; expected one of {METHODS}")
    if options.strategy and options.strategy not in strategy_names():
        raise InvalidInputError(f"strategy {options.strategy!r}; known: {strategy_names()}")
    if options.selection and options.selection not in SELECTIONS:
        raise InvalidInputError(f"selection {options.selection!r}; expected one of {SELECTIONS}")
    if options.det_thresh != 0.0:
        check_det_thresh(options.det_thresh, "det_thresh")
    for name in ("num_samples", "steps"):
        if getattr(options, name) < 0:
            raise InvalidInputError(f"{name} {getattr(options, name)}; expected >= 0 (0 = the default)")
    for key, value in options.strategy_options.items():
        if not math.isfinite(value):
            raise InvalidInputError(f"strategy_options[{key!r}]: {value} is not a finite number")
    t0 = options.strategy_options.get("t0")
    if t0 is not None and not (t0 == int(t0) and 0 <= t0 < NUM_TRAIN_STEPS):
        raise InvalidInputError(f"strategy_options['t0']: {t0}; expected a whole number in 0..{NUM_TRAIN_STEPS - 1}")
    strength = options.strategy_options.get("strength")
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise InvalidInputError(f"strategy_options['strength']: {strength}; expected 0..1")
    unknown = set(options.visibility_off) - set(VISIBILITY_SOURCES)
    if unknown:
        raise InvalidInputError(
            f"visibility_off: unknown source(s) {sorted(unknown)}; known: {', '.join(VISIBILITY_SOURCES)}"
        )
    if len(options.boxes) > MAX_GIVEN_BOXES:
        raise LimitExceededError(f"{len(options.boxes)} boxes given; the limit is {MAX_GIVEN_BOXES}")
    for i, box in enumerate(options.boxes):
        corners = (box.x1, box.y1, box.x2, box.y2)
        if not all(math.isfinite(v) for v in (*corners, box.score)) or box.x2 <= box.x1 or box.y2 <= box.y1:
            raise InvalidInputError(f"boxes[{i}]: {corners} is not a finite box with x2 > x1 and y2 > y1")


def check_scale(source: str, confidence: float) -> None:
    """A mica reply's scale fields: a known source and a confidence in [0, 1] (0 when not reported)."""
    if source and source not in SCALE_SOURCES:
        raise BackendError(f"mica reply: scale_source {source[:40]!r}; expected one of {SCALE_SOURCES} or none")
    if not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0) or (not source and confidence != 0.0):
        raise BackendError(f"mica reply: scale_confidence {confidence!r} is not in [0, 1] (or set without a source)")


def check_mask(mask: np.ndarray | None, image_shape: tuple[int, ...]) -> None:
    """The occlusion mask must be an (H, W) uint8 array the size of the decoded image."""
    if mask is None:
        return
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise InvalidInputError(f"mask: expected an (H, W) uint8 array, got {mask.shape} {mask.dtype}")
    if mask.shape != tuple(image_shape[:2]):
        raise InvalidInputError(f"mask is {mask.shape}, the image is {tuple(image_shape[:2])}: they must match")


class FacePipeline:
    """Per-image work of the gateway, independent of the transport that feeds it."""

    def __init__(self, front_end: FrontEnd, clients: MeshClients, *, max_pixels: int = 40_000_000,
                 max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES, face_workers: int = 4) -> None:
        self.front_end = front_end
        self.clients = clients
        self.max_pixels = max_pixels
        self.max_decode_bytes = max_decode_bytes
        self._faces_pool = ThreadPoolExecutor(max_workers=face_workers, thread_name_prefix="face")
        self._hands: HandDetector | bool | None = None  # None: not tried yet; False: unavailable
        self._canonical: CanonicalFace | bool | None = None  # the same for the canonical face
        self._branch_pool = ThreadPoolExecutor(max_workers=face_workers, thread_name_prefix="branch")
        self._default_strategy: str | None = None
        self._packs: dict[str, str] = {}  # backend -> its pack, from one Info call (ready backends only)

    def close(self) -> None:
        self._faces_pool.shutdown(wait=False, cancel_futures=True)
        self._branch_pool.shutdown(wait=False, cancel_futures=True)

    def process_image(
        self,
        image_id: str,
        data: bytes,
        options: gateway_pb2.ProcessOptions,
        mask: np.ndarray | None = None,
        deadline: Deadline | None = None,
    ) -> Iterator[gateway_pb2.FaceResult]:
        """Results for one image, one per face as soon as each is ready; errors become results."""
        started = time.monotonic()
        deadline = deadline or Deadline.none()
        try:
            check_options(options)
            image = decode_image(data, max_pixels=self.max_pixels, max_decode_bytes=self.max_decode_bytes)
            observe_decode_bytes(len(data), image.nbytes)
            check_mask(mask, image.shape)
            focal_35mm = exif_focal_35mm(data)
            faces = self._faces(image, options)
        except FacefuseError as exc:
            yield error_result(image_id, exc)
            return
        except Exception as exc:
            yield error_result(image_id, exc)
            return
        if not faces:
            yield gateway_pb2.FaceResult(image_id=image_id, face_index=-1, num_faces=0,
                                         status=status(grpc.StatusCode.NOT_FOUND, "no face found"))
            return
        num = len(faces)
        futures: list[Future[gateway_pb2.FaceResult]] = []
        for index, item in enumerate(faces):
            if isinstance(item, FacefuseError):
                futures.append(_done(error_result(image_id, item, index, num)))
                continue
            # copy_context: the face thread carries this image's request id (logs, metadata downstream)
            futures.append(self._faces_pool.submit(contextvars.copy_context().run, self._face_result,
                                                   image_id, index, num, item, image, options, mask, deadline,
                                                   focal_35mm))
        for future in as_completed(futures):
            result = future.result()
            result.seconds = time.monotonic() - started
            count_face(options.method or "detect", result.status.code)
            yield result

    def _faces(self, image: np.ndarray, options: gateway_pb2.ProcessOptions) -> list[AlignedFace | FacefuseError]:
        if options.det_thresh != 0.0:
            detections = self.front_end.detect(image, det_thresh=options.det_thresh)
        else:
            detections = self.front_end.detect(image)
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
            out.append(self.front_end.align(image, det))
        return out

    def _face_result(self, image_id: str, index: int, num: int, face: AlignedFace, image: np.ndarray,
                     options: gateway_pb2.ProcessOptions, mask: np.ndarray | None,
                     deadline: Deadline, focal_35mm: float | None = None) -> gateway_pb2.FaceResult:
        method = options.method or "detect"
        hw = (int(image.shape[0]), int(image.shape[1]))
        needs_farl = method in ("ofer", "fuse")
        if needs_farl and face.farl_input is None:
            from facefuse.face.farl_preprocess import farl_preprocess

            face.farl_input = farl_preprocess(np.clip(face.crop_box224 * 255.0 + 0.5, 0, 255).astype(np.uint8))
        result = gateway_pb2.FaceResult(image_id=image_id, face_index=index, num_faces=num,
                                        status=status(grpc.StatusCode.OK))
        try:
            visibility = None
            if method != "detect" and face.detection.landmarks is not None and face.detection.iris is None \
                    and hasattr(self.front_end, "estimate_iris"):
                # Iris size gives the open pack its metric scale (the human iris is ~11.7 mm across).
                face.detection.iris = self.front_end.estimate_iris(image, face.detection.landmarks).as_detection_iris()
            if method in ("ofer", "fuse"):
                visibility = self.visibility(image, face, mask, options)
            face_msg = wire.face_message(face, index, hw, with_crops=True)
            result.face.CopyFrom(face_msg if options.return_crops or method == "detect" else _without_crops(face_msg))
            pose_fit = pose_fit_input(face, hw, focal_35mm) if method in ("ofer", "fuse") \
                and not options.neutral_only else None
            if method == "mica":
                result.reconstruction.CopyFrom(self._mica(face_msg, deadline))
            elif method == "ofer":
                result.reconstruction.CopyFrom(self._ofer(face_msg, options, deadline, visibility, pose_fit))
            elif method == "fuse":
                self._fuse(face_msg, options, deadline, result, visibility, pose_fit)
        except Exception as exc:
            return error_result(image_id, exc, index, num)
        return result

    def visibility(self, image: np.ndarray, face: AlignedFace, mask: np.ndarray | None,
                   options: gateway_pb2.ProcessOptions) -> common_pb2.Visibility | None:
        """Which face regions the image shows: user mask, hands over the face, photometric test."""
        from facefuse.fusion.visibility import VisibilitySources

        landmarks = face.detection.landmarks
        if landmarks is None or len(landmarks) < 468:
            return None  # no dense landmarks (SCRFD front end): fusion assumes full visibility
        off = set(options.visibility_off)  # names and the mask's shape checked at the edge (check_options, check_mask)
        sources = VisibilitySources(
            mask="mask" not in off, photometric="photometric" not in off, hands="hands" not in off,
            pose="pose" not in off,
        )
        canonical = self._canonical_face() if sources.pose else None
        hand_points = None
        if sources.hands:
            detector = self._hand_detector()
            if detector is not None:
                # The palm model sees a 192 px view: search a region around the face so hands there are large enough.
                hand_points = [
                    hand.points
                    for hand in detector.detect(image, region=_grown_box(face.detection.box, image.shape, 2.5))
                ]
        # On the face's window only: converting a 4096² photo for each face cost ~1 s; the regions lie
        # inside the landmarks' box, so the window gives the same pixels, shifted by whole pixels.
        rows, cols = landmark_window(landmarks, image.shape)
        shift = np.array([cols.start, rows.start], np.float64)
        vis = sources.estimate(
            image[rows, cols],
            shifted_points(landmarks, shift),
            occluder_mask=None if mask is None else mask[rows, cols] > 127,
            hand_points=None if hand_points is None else [shifted_points(p, shift) for p in hand_points],
            triangles=None if canonical is None else canonical.faces,
            canonical_mm=None if canonical is None else canonical.vertices_mm,
        )
        message = common_pb2.Visibility(
            regions={k: float(v) for k, v in vis.regions.items()}, sources=list(vis.sources), unknown=list(vis.unknown)
        )
        return message

    def _canonical_face(self) -> CanonicalFace | None:
        """The 468-point topology's canonical face (triangles and frontal layout for the pose source), or
        None when the model store cannot give it (the pose source is then skipped, logged once)."""
        if self._canonical is None:
            try:
                from facefuse.assets.canonical_face import load_canonical_face

                self._canonical = load_canonical_face()
            except (ImportError, FacefuseError) as exc:
                log_event("pose_visibility_unavailable", reason=str(exc))
                self._canonical = False
        return self._canonical if not isinstance(self._canonical, bool) else None

    def _hand_detector(self) -> HandDetector | None:
        from facefuse.face.hands import HandDetector

        if self._hands is None:
            try:
                from facefuse.assets.store import ModelStore

                self._hands = HandDetector.from_store(ModelStore())
            except (ImportError, FacefuseError) as exc:
                log_event("hands_unavailable", reason=str(exc))
                self._hands = False
        return self._hands if isinstance(self._hands, HandDetector) else None

    # -- branches --------------------------------------------------------------------------------

    def _timeout(self, deadline: Deadline) -> float:
        timeout = deadline.timeout(DEFAULT_CALL_TIMEOUT_S)
        return DEFAULT_CALL_TIMEOUT_S if timeout is None else timeout

    def _call(self, backend: str, fn: grpc.UnaryUnaryMultiCallable | None, request: object, deadline: Deadline) -> Any:
        """One idempotent backend call (every call the gateway makes is one), within the caller's deadline."""
        if fn is None:
            raise BackendUnavailableError(f"{backend} service is not configured on this gateway")

        def attempt() -> Any:
            call = fn.future(request, timeout=self._timeout(deadline), metadata=request_metadata())
            with deadline.cancelling(call):
                return call.result()

        return _retrying(backend, attempt)

    def _mica(self, face: common_pb2.Face, deadline: Deadline) -> gateway_pb2.Reconstruction:
        stub = self.clients.mica
        crops = self._crops("mica", MICA_CROPS, OPEN_MICA_CROPS, ANY_MICA_CROPS, deadline)
        request = mica_pb2.PredictRequest(faces=[only_crops(face, crops)], return_mesh=True,
                                          return_landmarks=True)
        reply = self._call("mica", stub.Predict if stub else None, request, deadline)
        pred = reply.predictions[0]
        check_scale(pred.scale_source, pred.scale_confidence)
        return gateway_pb2.Reconstruction(method="mica", shape=pred.shape, mesh=pred.mesh,
                                          landmarks68=pred.landmarks68, kpt7=pred.kpt7,
                                          scale_source=pred.scale_source, scale_confidence=pred.scale_confidence)

    def _samples(self, face: common_pb2.Face, options: gateway_pb2.ProcessOptions, deadline: Deadline,
                 start: common_pb2.Tensor | None = None, t0: int = 0,
                 guide: common_pb2.Tensor | None = None, strength: float = 0.0,
                 visibility: common_pb2.Visibility | None = None) -> np.ndarray:
        stub = self.clients.ofer
        request = ofer_pb2.SampleRequest(face=only_crops(face, self._ofer_crops(SAMPLE_CROPS, deadline)),
                                         num_samples=options.num_samples or 10,
                                         steps=options.steps,
                                         mode=options.sampler_mode or "fast", seed=options.seed)
        if start is not None:
            request.start_shape.CopyFrom(start)
            request.start_t0 = t0
        if guide is not None:
            request.guide_shape.CopyFrom(guide)
            request.guide_strength = strength
        if visibility is not None:
            request.visibility.CopyFrom(visibility)
        if stub is None:
            raise BackendUnavailableError("ofer service is not configured on this gateway")
        sample = stub.Sample

        def attempt() -> list[np.ndarray]:
            call = sample(request, timeout=self._timeout(deadline), metadata=request_metadata())
            with deadline.cancelling(call):
                return [wire.to_numpy(chunk.shapes, "shapes") for chunk in call]

        chunks = _retrying("ofer", attempt)  # seeded: a second try gives the same samples
        return np.concatenate(chunks, axis=0) if chunks else np.zeros((0, 300), np.float32)

    def _rank(self, face: common_pb2.Face, candidates: np.ndarray, deadline: Deadline,
              visibility: common_pb2.Visibility | None = None) -> np.ndarray:
        stub = self.clients.ofer
        request = ofer_pb2.RankRequest(face=only_crops(face, self._ofer_crops(RANK_CROPS, deadline)),
                                       candidates=wire.from_numpy(candidates.astype(np.float32)))
        if visibility is not None:
            request.visibility.CopyFrom(visibility)
        reply = self._call("ofer", stub.Rank if stub else None, request, deadline)
        return np.array(wire.to_numpy(reply.scores, "scores"))

    def _fusion(self, request: fusion_pb2.FuseRequest, deadline: Deadline) -> fusion_pb2.FuseResponse:
        stub = self.clients.fusion
        return self._call("fusion", stub.Fuse if stub else None, request, deadline)

    def _fused_reconstruction(
        self,
        method: str,
        fused: fusion_pb2.FuseResponse,
        candidates: np.ndarray,
        scores: np.ndarray,
        visibility: common_pb2.Visibility | None,
    ) -> gateway_pb2.Reconstruction:
        rec = gateway_pb2.Reconstruction(
            method=method,
            strategy=fused.strategy,
            shape=fused.shape,
            mesh=fused.mesh,
            landmarks68=fused.landmarks68,
            kpt7=fused.kpt7,
            vertex_spread=fused.vertex_spread,
            confidence=fused.confidence,
            samples=wire.from_numpy(candidates.astype(np.float32)),
            sample_scores=wire.from_numpy(scores.astype(np.float32)),
        )
        if visibility is not None:
            rec.visibility.CopyFrom(visibility)
        if fused.HasField("posed"):
            rec.posed.CopyFrom(fused.posed)
        return rec

    def _fuse_request(
        self,
        strategy: str,
        options: gateway_pb2.ProcessOptions,
        candidates: np.ndarray,
        scores: np.ndarray,
        visibility: common_pb2.Visibility | None,
        mica_shape: common_pb2.Tensor | None = None,
        pose_fit: common_pb2.PoseFitInput | None = None,
    ) -> fusion_pb2.FuseRequest:
        request = fusion_pb2.FuseRequest(strategy=strategy, options=dict(options.strategy_options),
                                         samples=wire.from_numpy(candidates.astype(np.float32)),
                                         scores=wire.from_numpy(scores.astype(np.float32)))
        if mica_shape is not None:
            request.mica_shape.CopyFrom(mica_shape)
        if visibility is not None:
            request.visibility.CopyFrom(visibility)
        if pose_fit is not None:
            request.pose_fit.CopyFrom(pose_fit)
        return request

    def _ofer(self, face: common_pb2.Face, options: gateway_pb2.ProcessOptions, deadline: Deadline,
              visibility: common_pb2.Visibility | None,
              pose_fit: common_pb2.PoseFitInput | None = None) -> gateway_pb2.Reconstruction:
        samples = self._samples(face, options, deadline, visibility=visibility)
        scores = self._rank(face, samples, deadline, visibility)
        fused = self._fusion(
            self._fuse_request("ofer", options, samples, scores, visibility, pose_fit=pose_fit), deadline
        )
        return self._fused_reconstruction("ofer", fused, samples, scores, visibility)

    def _ofer_crops(self, flame_crops: tuple[str, ...], deadline: Deadline) -> tuple[str, ...]:
        return self._crops("ofer", flame_crops, OPEN_OFER_CROPS, ANY_OFER_CROPS, deadline)

    def _crops(self, backend: str, flame_crops: tuple[str, ...], open_crops: tuple[str, ...],
               any_crops: tuple[str, ...], deadline: Deadline) -> tuple[str, ...]:
        """The image tensors a call to ``backend`` carries: ``flame_crops`` or ``open_crops`` by its pack,
        ``any_crops`` (what either pack may read) while the pack is unknown: a request too big, never one
        missing a tensor. The pack comes from the backend's Info, asked until a ready backend answers."""
        pack = self._packs.get(backend)
        if pack is None:
            stub = getattr(self.clients, backend)
            try:
                info = self._call(backend, stub.Info if stub else None, common_pb2.InfoRequest(), deadline)
            except FacefuseError:
                return any_crops
            pack = info.pack
            if info.ready:
                self._packs[backend] = pack
        if pack == "flame":
            return flame_crops
        return open_crops if pack == "open" else any_crops

    def default_strategy(self, deadline: Deadline) -> str:
        if self._default_strategy is None:
            stub = self.clients.fusion
            reply = self._call(
                "fusion", stub.ListStrategies if stub else None, fusion_pb2.ListStrategiesRequest(), deadline
            )
            self._default_strategy = reply.default_strategy
        return self._default_strategy

    def _fuse(self, face: common_pb2.Face, options: gateway_pb2.ProcessOptions, deadline: Deadline,
              result: gateway_pb2.FaceResult, visibility: common_pb2.Visibility | None,
              pose_fit: common_pb2.PoseFitInput | None = None) -> None:
        """MICA and OFER concurrently, or MICA first when the strategy steers the sampler or ranker with it."""
        from facefuse.fusion.strategies import steering_for

        strategy = options.strategy or self.default_strategy(deadline)
        steer = steering_for(strategy, dict(options.strategy_options), _overall_visibility(visibility))
        generative: Future[tuple[np.ndarray, np.ndarray]] | None = None
        if not steer.mica_first:
            generative = self._branch_pool.submit(
                contextvars.copy_context().run, self._sample_and_rank, face, options, deadline, visibility
            )
        mica = self._mica(face, deadline)
        try:
            if generative is not None:
                samples, scores = generative.result()
                candidates = samples
            else:
                samples = self._samples(
                    face,
                    options,
                    deadline,
                    visibility=visibility,
                    start=mica.shape if steer.start_t0 is not None else None,
                    t0=steer.start_t0 or 0,
                    guide=mica.shape if steer.guide_strength is not None else None,
                    strength=steer.guide_strength or 0.0,
                )
                candidates = samples
                if steer.mica_in_pool:  # MICA's shape joins the pool as the last candidate
                    candidates = np.concatenate([samples, wire.to_numpy(mica.shape)[None].astype(np.float32)], axis=0)
                scores = self._rank(face, candidates, deadline, visibility)
        except FacefuseError as exc:
            if not is_backend_down(exc):
                raise
            # Documented fallback, only when the generative branch is down or out of time: the face still
            # gets MICA's shape, flagged. Anything else the ofer service says (bad input, its own bug) is
            # this face's status, raised on.
            log_event("fallback", branch="ofer", to="mica", code=status_code_for(exc).name, reason=str(exc))
            mica.fallback = f"ofer unavailable, fell back to mica: {exc}"
            mica.strategy = "mica"
            result.reconstruction.CopyFrom(mica)
            return
        fused = self._fusion(
            self._fuse_request(strategy, options, candidates, scores, visibility, mica.shape, pose_fit), deadline
        )
        result.reconstruction.CopyFrom(self._fused_reconstruction("fuse", fused, candidates, scores, visibility))
        # The fused mesh lives at the mica branch's metric scale: say where that scale came from.
        result.reconstruction.scale_source = mica.scale_source
        result.reconstruction.scale_confidence = mica.scale_confidence
        if options.save_branches:
            result.branches.add(name="mica", reconstruction=mica)
            n = len(samples)
            ofer = self._fusion(self._fuse_request("ofer", options, samples, scores[:n], visibility), deadline)
            result.branches.add(
                name="ofer", reconstruction=self._fused_reconstruction("ofer", ofer, samples, scores[:n], visibility)
            )

    def _sample_and_rank(self, face: common_pb2.Face, options: gateway_pb2.ProcessOptions, deadline: Deadline,
                         visibility: common_pb2.Visibility | None) -> tuple[np.ndarray, np.ndarray]:
        samples = self._samples(face, options, deadline, visibility=visibility)
        return samples, self._rank(face, samples, deadline, visibility)


UNAVAILABLE_RETRIES = 1
"""Tries of an idempotent backend call beyond gRPC's own retries, which stop once a reply has begun: a
replica that dies while sending its reply costs one more try, which round robin sends to another."""

T = TypeVar("T")


def _retrying(backend: str, attempt: Callable[[], T]) -> T:
    for tries_left in range(UNAVAILABLE_RETRIES, -1, -1):
        try:
            return attempt()
        except grpc.RpcError as exc:
            error = error_from_rpc(exc, f"{backend} service")
            if not isinstance(error, BackendUnavailableError) or tries_left == 0:
                raise error from None
            log_event("retry", backend=backend, reason=str(error))
    raise AssertionError("unreachable")


def pose_fit_input(face: AlignedFace, hw: tuple[int, int], focal_35mm: float | None) -> common_pb2.PoseFitInput | None:
    """What the fusion service's posed-face fit needs of this face, or None without the 468 FaceMesh points
    (SCRFD front end): focal from the photo's EXIF when it has one, else the documented default."""
    landmarks = face.detection.landmarks
    if landmarks is None or len(landmarks) < 468 or np.shape(landmarks)[1] < 3:
        return None
    height, width = hw
    source = "exif" if focal_35mm is not None else "default"
    focal = focal_px_from_35mm(focal_35mm if focal_35mm is not None else DEFAULT_FOCAL_35MM, width, height)
    return common_pb2.PoseFitInput(
        landmarks=wire.from_numpy(np.asarray(landmarks, np.float32)[:468, :3], unit="px"),
        image_size=wire.from_numpy(np.array([width, height], np.int32), unit="px"),
        focal_px=focal, focal_source=source)


def _grown_box(box: np.ndarray, shape: tuple[int, ...], factor: float) -> np.ndarray:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half = max(box[2] - box[0], box[3] - box[1]) * factor / 2
    return np.array(
        [max(cx - half, 0), max(cy - half, 0), min(cx + half, shape[1]), min(cy + half, shape[0])], np.float32
    )


WINDOW_MARGIN_PX = 4
"""Pixels around the landmarks' box in the visibility window: the region polygons join landmarks, so
they lie inside the box; the margin covers the one-pixel rounding of the polygon fill."""


def landmark_window(landmarks: np.ndarray, image_shape: tuple[int, ...]) -> tuple[slice, slice]:
    """(rows, cols) of the image around the landmarks' box (plus ``WINDOW_MARGIN_PX``), clipped to the
    image; the whole image when the landmarks are not all finite (the visibility code reports those)."""
    height, width = int(image_shape[0]), int(image_shape[1])
    xy = np.asarray(landmarks, np.float64)[:, :2]
    if xy.size == 0 or not np.all(np.isfinite(xy)):
        return slice(0, height), slice(0, width)
    x0, y0 = np.floor(xy.min(axis=0)).astype(int) - WINDOW_MARGIN_PX
    x1, y1 = np.ceil(xy.max(axis=0)).astype(int) + WINDOW_MARGIN_PX + 1
    x0, x1 = min(max(x0, 0), width), min(max(x1, 0), width)
    y0, y1 = min(max(y0, 0), height), min(max(y1, 0), height)
    if x1 <= x0 or y1 <= y0:  # the face lies wholly outside the frame: nothing of it is seen either way
        return slice(0, height), slice(0, width)
    return slice(int(y0), int(y1)), slice(int(x0), int(x1))


def shifted_points(points: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Pixel points (x, y[, more]) in a window that starts at ``shift`` (whole pixels: exact in float64)."""
    moved = np.array(points, np.float64, copy=True)
    if moved.ndim == 2 and moved.shape[1] >= 2:
        moved[:, :2] -= shift
    return moved


def _overall_visibility(visibility: common_pb2.Visibility | None) -> float:
    if visibility is None or not visibility.regions:
        return 1.0
    return float(np.mean(list(visibility.regions.values())))


def _without_crops(face: common_pb2.Face) -> common_pb2.Face:
    return only_crops(face, ())


def only_crops(face: common_pb2.Face, keep: tuple[str, ...]) -> common_pb2.Face:
    """``face`` with only the image tensors in ``keep`` (its boxes, points and sizes all stay)."""
    slim = common_pb2.Face()
    slim.CopyFrom(face)
    for name in CROP_FIELDS:
        if name not in keep:
            slim.ClearField(name)
    return slim


def _done(value: gateway_pb2.FaceResult) -> Future[gateway_pb2.FaceResult]:
    future: Future[gateway_pb2.FaceResult] = Future()
    future.set_result(value)
    return future
