"""The flame pack: the official MICA / OFER checkpoints and FLAME 2020, loaded from the user's folder."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facefuse.assets.registry import asset_path
from facefuse.errors import AssetError, InvalidInputError
from facefuse.face.types import AlignedFace
from facefuse.models.arcface import IResNet100, fused_for_inference
from facefuse.models.clip_vit import half_precision_image_tower
from facefuse.models.flame import (
    METRES_TO_MM,
    N_SHAPE,
    NOW7_FROM_LMK68,
    FlameLayer,
    FlameModelData,
    LandmarkEmbedding,
    barycentric_landmarks,
)
from facefuse.models.idgen import IdGen
from facefuse.models.idrank import IdRank
from facefuse.models.mica import Mica
from facefuse.packs.base import BackendStatus, FusionSetup, ShapeResult, StopCheck, resolve_device

TOPOLOGY = "flame2020"

NUMERICS_ENV = "FACEFUSE_NUMERICS"
"""'fast' (default: optimised layers; IdRank's image networks in bfloat16 on a CPU with AMX, every ArcFace and
FaRL in float16 on CUDA), 'fast-float32' (the same layers, float32 everywhere: float32 rounding only) or
'reproduce-official' (the shipped layers, bit for bit). OFER with ``FACEFUSE_IDGEN_PROJECTIONS=reproduce-official``
always runs reproduce-official. See :class:`NetworkPrecision`."""
NUMERICS_MODES = ("fast", "fast-float32", "reproduce-official")
OPTIMISED_MODES = ("fast", "fast-float32")


def numerics_mode(projections: str | None = None) -> str:
    """The numerics mode a backend runs in: ``FACEFUSE_NUMERICS``, forced to reproduce-official by the
    reproduce-official projections (a replay of the official program must not change a single bit)."""
    import os

    mode = os.environ.get(NUMERICS_ENV, "fast") or "fast"
    if mode not in NUMERICS_MODES:
        # A configuration error: the service reports it as its unavailable backend's message.
        raise AssetError(f"{NUMERICS_ENV}={mode!r}: expected one of {', '.join(NUMERICS_MODES)}")
    return "reproduce-official" if projections == "reproduce-official" else mode


def cpu_has_bfloat16_matrix_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX), where oneDNN runs ArcFace and
    FaRL ~3.5x faster in bfloat16 than in float32. Without AMX bfloat16 is emulated or barely faster, so the
    fast mode stays float32 there. (A private torch probe: absent from a future torch means False.)"""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if callable(probe) else False
    except RuntimeError:
        return False


@dataclass(frozen=True)
class NetworkPrecision:
    """The dtypes the flame pack's image networks run in (everything else is always float32).

    ``shape``: the ArcFaces whose embeddings become shapes (MICA's, IdGen's); ``rank``: IdRank's ArcFace and
    FaRL tower, whose outputs only score candidates. On an AMX CPU only ``rank`` goes to bfloat16: bfloat16's
    8-bit mantissa moved the fused mesh by up to 0.6 mm when the shape ArcFaces used it, while IdRank picked
    the same sample (docs/performance.md#numerics-modes). On CUDA both are float16 (11-bit mantissa)."""

    shape: torch.dtype = torch.float32
    rank: torch.dtype = torch.float32

    @classmethod
    def choose(cls, numerics: str, device: str) -> NetworkPrecision:
        if numerics != "fast":
            return cls()
        if device.startswith("cuda"):
            return cls(torch.float16, torch.float16)
        if cpu_has_bfloat16_matrix_units():
            return cls(torch.float32, torch.bfloat16)
        return cls()

    def describe(self) -> str:
        """For ``Info`` details: 'float32', or e.g. 'shape float32, rank bfloat16'."""
        if self.shape == self.rank:
            return _dtype_name(self.shape)
        return f"shape {_dtype_name(self.shape)}, rank {_dtype_name(self.rank)}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fast_arcface(arcface: torch.nn.Module, dtype: torch.dtype = torch.float32) -> IResNet100:
    """The optimised ArcFace: BatchNorms folded into the convolutions, channels-last, weights in ``dtype``."""
    if not isinstance(arcface, IResNet100):
        raise TypeError(f"fast_arcface: expected an IResNet100, got {type(arcface).__name__}")
    return fused_for_inference(arcface.eval(), channels_last=True, dtype=None if dtype == torch.float32 else dtype)


def speed_up_ofer(idgen: IdGen, idrank: IdRank, precision: NetworkPrecision = NetworkPrecision()) -> None:
    """The optimised OFER networks in place: the Unet's 1x1 convolutions as matrix products and its FiLMs
    once per face and step (``IdGen.shared_films``), the folded channels-last ArcFaces (IdGen's in
    ``precision.shape``, IdRank's in ``precision.rank``; a shared one in ``precision.shape``, since IdGen
    reads it), the FaRL image tower in ``precision.rank``, and IdRank's score net with the pool's shared
    terms computed once (``RankMLPNet.forward_pool``, float32). The checkpoints were loaded into the
    shipped layers before this, with strict key matching."""
    idgen.net.use_matmul(True)
    idgen.shared_films = True
    idrank.pool_scoring = True
    if isinstance(idgen.arcface, SharedArcFace) and idgen.arcface is idrank.arcface:  # one fast copy, still shared
        idgen.arcface.arcface = fast_arcface(idgen.arcface.arcface, precision.shape)
    else:
        idgen.arcface = fast_arcface(idgen.arcface, precision.shape)
        idrank.arcface = fast_arcface(idrank.arcface, precision.rank)
    if precision.rank != torch.float32:
        half_precision_image_tower(idrank.farl, precision.rank)


def tensor_copy(array: np.ndarray, device: str) -> torch.Tensor:
    """``array`` as a new tensor on ``device``: arrays decoded from the wire are read-only views of the
    message, which torch must not share (``torch.from_numpy`` would, and warns)."""
    return torch.tensor(np.asarray(array), device=device)


def load_flame(directory: Path) -> FlameModelData:
    """FLAME 2020 with its landmark embedding, from the assets folder (errors name the file)."""
    from facefuse.assets.flame_file import load_flame_model

    return load_flame_model(asset_path(directory, "flame2020"), expect="2020",
                            landmark_embedding=asset_path(directory, "landmark_embedding"))


def landmark_function(
    flame: FlameModelData, embedding: LandmarkEmbedding | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """vertices (V,3) in any unit -> the 68 iBUG landmarks (68,3) in the same unit."""
    lmk = embedding or flame.landmarks
    if lmk is None:
        raise ValueError("no landmark embedding")
    faces = torch.as_tensor(flame.faces)
    idx = torch.as_tensor(lmk.full_lmk_faces_idx[0])
    bary = torch.as_tensor(lmk.full_lmk_bary_coords[0], dtype=torch.float64)

    def landmarks(vertices: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(vertices, np.float64))[None]
        return barycentric_landmarks(v, faces, idx, bary)[0].numpy()

    return landmarks


class MicaBackend:
    """MICA on ``mica.tar``: aligned ArcFace blobs -> β (300), neutral FLAME mesh and landmarks in mm."""

    def __init__(self, mica: Mica, device: str, source: str) -> None:
        self.mica = mica
        self.device = device
        flame = mica.flame
        self.faces = flame.faces_tensor.cpu().numpy().astype(np.int32)
        self.status = BackendStatus("mica", "mica", "flame", True, False, "ready", device=device,
                                    details={"checkpoint": source, "vertices": str(flame.num_vertices)})

    @classmethod
    def from_assets(cls, directory: Path, device: str = "auto") -> MicaBackend:
        from facefuse.assets.mica_checkpoint import load_mica

        device = resolve_device(device)
        numerics = numerics_mode()
        path = asset_path(directory, "mica")
        mica = load_mica(path, flame=load_flame(directory), device=device)
        precision = NetworkPrecision.choose(numerics, device)
        if numerics in OPTIMISED_MODES:
            mica.arcface = fast_arcface(mica.arcface, precision.shape)
        backend = cls(mica, device, str(path))
        backend.status.details["numerics"] = numerics
        backend.status.details["image_networks"] = _dtype_name(precision.shape)
        differences = mica.load_report.get("flame_differences")
        if isinstance(differences, dict) and differences:  # visible in Info, not only in the log
            from facefuse.assets.mica_checkpoint import describe_flame_differences

            backend.status.details["flame_warning"] = describe_flame_differences(differences)
        return backend

    @torch.inference_mode()
    def predict(self, faces: Sequence[AlignedFace]) -> list[ShapeResult]:
        blob = torch.from_numpy(np.stack([f.arcface_blob for f in faces])).to(self.device)
        out = self.mica(blob)
        vertices_mm = (out.vertices * METRES_TO_MM).float()
        landmarks_mm = self.mica.flame.landmarks68(vertices_mm)
        results = []
        for i in range(len(faces)):
            lmk68 = landmarks_mm[i].cpu().numpy()
            results.append(ShapeResult(
                vertices_mm=vertices_mm[i].cpu().numpy(), faces=self.faces, topology=TOPOLOGY,
                shape=out.shape[i].float().cpu().numpy(), identity=out.identity[i].float().cpu().numpy(),
                landmarks68_mm=lmk68, kpt7_mm=lmk68[list(NOW7_FROM_LMK68)]))
        return results


SAMPLER_MODES = ("fast", "official")


@dataclass
class SampleJob:
    """One Sample request, as the ofer service's batcher hands it over."""

    face: AlignedFace
    num_samples: int
    mode: str
    steps: int
    seed: int
    start_shape: np.ndarray | None = None
    start_t0: int = 0
    guide_shape: np.ndarray | None = None
    guide_strength: float = 0.0

    @property
    def has_hooks(self) -> bool:
        return self.start_shape is not None or (self.guide_shape is not None and self.guide_strength > 0)
PROJECTIONS_ENV = "FACEFUSE_IDGEN_PROJECTIONS"
"""'default' (facefuse's seeded, versioned draw), 'reproduce-official' (replay of OFER's construction RNG) or a file."""


class LayerStopChecks:
    """Stops a running network between its layers when the caller is gone.

    One sampler step of a 1000-sample batch takes seconds on a CPU, too long to wait for the next step's
    check. A forward pre-hook on every submodule calls the stop check of the thread running the forward
    (thread-local, so callers sharing the modules never stop each other's work); it changes no number.
    """

    def __init__(self, *modules: torch.nn.Module | None) -> None:
        """Hooks every submodule of the given networks (None: a network this backend was built without)."""
        self._local = threading.local()
        for module in modules:
            if module is None:
                continue
            for submodule in module.modules():
                submodule.register_forward_pre_hook(self._before_layer)

    def _before_layer(self, _module: torch.nn.Module, _args: object) -> None:
        check: StopCheck | None = getattr(self._local, "check", None)
        if check is not None:
            check()

    @contextmanager
    def watching(self, check: StopCheck | None) -> Iterator[None]:
        """Within the block, this thread's forwards call ``check`` before every layer (None: no checks)."""
        previous = getattr(self._local, "check", None)
        self._local.check = check if check is not None else previous
        try:
            if check is not None:
                check()
            yield
        finally:
            self._local.check = previous


class OferBackend:
    """OFER on the flame pack: IdGen samples β for a face, IdRank scores candidate shapes.

    ``stop_check`` (see ``StopCheck``) is called before the work, after every sampler step and before
    every layer of IdGen, IdRank and FLAME, so abandoned work ends within one layer's time."""

    sample_and_rank_concurrently = True
    """A Sample and a Rank may run at once on separate threads: they read shared modules only in inference
    mode, stop checks are per thread, and the shared-ArcFace cache has its own lock."""

    def __init__(self, idgen: IdGen, idrank: IdRank, flame: FlameLayer, device: str, details: dict[str, str],
                 *, reproduce_official: bool = False) -> None:
        self.idgen = idgen
        self.idrank = idrank
        self.flame = flame
        self.device = device
        self.reproduce_official = reproduce_official
        self.status = BackendStatus(
            "ofer", "ofer-idgen-idrank", "flame", True, False, "ready", device=device, details=details
        )
        self.stop_checks = LayerStopChecks(idgen, idrank, flame)

    @classmethod
    def from_assets(cls, directory: Path, device: str = "auto", projections: str | None = None) -> OferBackend:
        import os

        from facefuse.assets.idgen_checkpoint import load_idgen
        from facefuse.assets.idrank_checkpoint import load_idrank

        device = resolve_device(device)
        projections = projections or os.environ.get(PROJECTIONS_ENV, "default")
        numerics = numerics_mode(projections)
        flame_data = load_flame(directory)
        idgen = load_idgen(asset_path(directory, "idgen"), projections=projections, device=device)
        farl = asset_path(directory, "farl")
        idrank = load_idrank(asset_path(directory, "idrank"), front_indices_path=asset_path(directory, "frontindices"),
                             farl_path=farl if farl.is_file() else None, device=device,
                             num_vertices=flame_data.num_vertices).eval()
        flame = FlameLayer(flame_data).to(device).eval()
        reproduce = projections == "reproduce-official"
        shared = share_identical_arcface(idgen, idrank)  # compares the shipped weights, before any fast copy
        precision = NetworkPrecision.choose(numerics, device)
        if numerics in OPTIMISED_MODES:
            speed_up_ofer(idgen, idrank, precision)
        details = {"projections": str(idgen.load_report.get("projections", projections)),
                   "vertices": str(flame_data.num_vertices), "numerics": numerics,
                   "image_networks": precision.describe(),
                   "arcface_shared": shared}
        if reproduce:
            details["official_sampling"] = ("mode 'official' with seed S starts from the RNG state of the official "
                                            "program seeded with S at its first sampling")
        if "farl_file" in idrank.load_report:
            details["farl_file"] = idrank.load_report["farl_file"]
        return cls(idgen, idrank, flame, device, details, reproduce_official=reproduce)

    def noise_generator(self, mode: str, seed: int) -> torch.Generator:
        """The generator a sampling with ``seed`` draws from.

        In reproduce-official mode the ``official`` sampler starts where the official program seeded with
        ``seed`` starts its first sampling (see ``official_sampling_state``); otherwise it is a fresh
        generator seeded with ``seed``.
        """
        generator = torch.Generator()
        if self.reproduce_official and mode == "official":
            from facefuse.assets.idgen_checkpoint import official_sampling_state

            return generator.set_state(official_sampling_state(int(seed)))
        return generator.manual_seed(int(seed))

    @torch.inference_mode()
    def sample(
        self,
        face: AlignedFace,
        num_samples: int,
        *,
        mode: str,
        steps: int,
        seed: int,
        start_shape: np.ndarray | None,
        start_t0: int,
        guide_shape: np.ndarray | None,
        guide_strength: float,
        visibility: object | None = None,
        stop_check: StopCheck | None = None,
    ) -> np.ndarray:
        with self.stop_checks.watching(stop_check):
            return self._sample(face, num_samples, mode=mode, steps=steps, seed=seed, start_shape=start_shape,
                                start_t0=start_t0, guide_shape=guide_shape, guide_strength=guide_strength,
                                stop_check=stop_check)

    def _sample(self, face: AlignedFace, num_samples: int, *, mode: str, steps: int, seed: int,
                start_shape: np.ndarray | None, start_t0: int, guide_shape: np.ndarray | None,
                guide_strength: float, stop_check: StopCheck | None) -> np.ndarray:
        from facefuse.models.diffusion import DDIMSampler, OfficialSampler

        for name, given in (("start_shape", start_shape), ("guide_shape", guide_shape)):
            if given is not None and np.shape(given) != (N_SHAPE,):
                raise InvalidInputError(f"{name}: expected ({N_SHAPE},) FLAME coefficients, got {np.shape(given)}")
        blob = tensor_copy(face.arcface_blob, self.device)[None]
        context = self.idgen.context(blob)
        sampler = (
            OfficialSampler() if mode == "official" else (DDIMSampler(num_steps=steps) if steps else DDIMSampler())
        )
        generator = self.noise_generator(mode, seed)
        options: dict[str, object] = {}
        if start_shape is not None:
            options.update(
                x0_start=tensor_copy(np.asarray(start_shape, np.float32), "cpu")[None].expand(num_samples, -1),
                t0=start_t0,
            )
        if guide_shape is not None and guide_strength > 0:
            options.update(
                guide_target=tensor_copy(np.asarray(guide_shape, np.float32), "cpu")[None].expand(num_samples, -1),
                guide_strength=float(guide_strength),
            )
        if stop_check is not None:
            options.update(callback=_step_check(stop_check))
        shapes = self.idgen.sample(context, num_samples, sampler, generator, **options)
        return shapes.to(torch.float32).cpu().numpy()

    @torch.inference_mode()
    def sample_batch(self, jobs: Sequence[SampleJob], stop_check: StopCheck | None = None) -> list[np.ndarray]:
        """Plain sampling jobs of several faces in one sampler run per (mode, steps) group.

        Each job's initial noise comes from its own seed, exactly as ``sample`` draws it, so a batched
        job equals its unbatched run up to float rounding (~1e-4 here: BLAS blocking depends on the
        batch size). That is why the ofer service batches only when asked to (``--max-batch``).
        """
        with self.stop_checks.watching(stop_check):
            return self._sample_batch(jobs, stop_check)

    def _sample_batch(self, jobs: Sequence[SampleJob], stop_check: StopCheck | None) -> list[np.ndarray]:
        from facefuse.models.diffusion import DDIMSampler, OfficialSampler

        results: dict[int, np.ndarray] = {}
        groups: dict[tuple[str, int], list[int]] = {}
        for index, job in enumerate(jobs):
            if job.has_hooks:
                results[index] = self.sample(job.face, job.num_samples, mode=job.mode, steps=job.steps, seed=job.seed,
                                             start_shape=job.start_shape, start_t0=job.start_t0,
                                             guide_shape=job.guide_shape, guide_strength=job.guide_strength,
                                             stop_check=stop_check)
            else:
                groups.setdefault((job.mode, job.steps), []).append(index)
        for (mode, steps), members in groups.items():
            blobs = torch.from_numpy(np.stack([jobs[i].face.arcface_blob for i in members])).to(self.device)
            contexts = self.idgen.context(blobs)
            counts = [jobs[i].num_samples for i in members]
            context = torch.cat([contexts[k:k + 1].expand(n, -1) for k, n in enumerate(counts)])
            noise = torch.cat(
                [
                    torch.randn(jobs[i].num_samples, 300, generator=self.noise_generator(mode, jobs[i].seed))
                    for i in members
                ]
            )
            sampler = (
                OfficialSampler() if mode == "official" else (DDIMSampler(num_steps=steps) if steps else DDIMSampler())
            )
            sampled = self.idgen.sample(context, len(noise), sampler, initial_noise=noise.to(self.device),
                                        callback=None if stop_check is None else _step_check(stop_check))
            shapes = sampled.to(torch.float32).cpu().numpy()
            offsets = np.cumsum([0, *counts])
            for k, i in enumerate(members):
                results[i] = shapes[offsets[k]:offsets[k + 1]]
        return [results[i] for i in range(len(jobs))]

    @torch.inference_mode()
    def rank(self, face: AlignedFace, candidates: np.ndarray, visibility: object | None = None,
             stop_check: StopCheck | None = None, context: torch.Tensor | None = None) -> np.ndarray:
        """IdRank's scores of the candidates. ``context``: this face's ``rank_context``, when the caller
        already has it (the ofer service computes it while the face's Sample runs); else computed here."""
        with self.stop_checks.watching(stop_check):
            return self._rank(face, candidates, context)

    @torch.inference_mode()
    def rank_context(self, face: AlignedFace, stop_check: StopCheck | None = None) -> torch.Tensor:
        """IdRank's (1, 1024) context of a face. It depends only on the face's ArcFace blob and FaRL input,
        never on the candidates, so it can be computed before the samples exist, by the same call ``rank``
        makes (the same numbers, bit for bit)."""
        with self.stop_checks.watching(stop_check):
            return self._rank_context(face)

    def _rank_context(self, face: AlignedFace) -> torch.Tensor:
        if face.farl_input is None:
            raise InvalidInputError("face.farl_input is missing: IdRank needs the CLIP-normalised face crop")
        blob = tensor_copy(face.arcface_blob, self.device)[None]
        farl = tensor_copy(face.farl_input, self.device)[None]
        return self.idrank.context(blob, farl)

    def _rank(self, face: AlignedFace, candidates: np.ndarray, context: torch.Tensor | None) -> np.ndarray:
        if face.farl_input is None:
            raise InvalidInputError("face.farl_input is missing: IdRank needs the CLIP-normalised face crop")
        if np.ndim(candidates) != 2 or np.shape(candidates)[1] != N_SHAPE:
            raise InvalidInputError(
                f"candidates: expected (N, {N_SHAPE}) FLAME coefficients, got {np.shape(candidates)}"
            )
        if context is None:
            context = self._rank_context(face)
        vertices = self.flame.shape_vertices(tensor_copy(np.asarray(candidates, np.float32), self.device))
        return self.idrank.score(vertices, context).to(torch.float32).cpu().numpy()


class SharedArcFace(torch.nn.Module):
    """One ArcFace for IdGen and IdRank when their checkpoints carry the same weights: the Sample and
    Rank calls of a face then run its ArcFace pass once. A pass is reused only for the same input bytes
    and the same ``apply_features``, so results are bit for bit those of two separate passes."""

    CACHE_SIZE = 16

    def __init__(self, arcface: torch.nn.Module) -> None:
        super().__init__()
        self.arcface = arcface
        self._cache: dict[tuple[bytes, tuple[int, ...], bool], torch.Tensor] = {}
        self._lock = threading.Lock()
        self.passes = 0
        """ArcFace passes actually run (the rest came from the cache)."""

    def forward(self, blob: torch.Tensor, *, apply_features: bool = True) -> torch.Tensor:
        import hashlib

        data = blob.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        key = (hashlib.blake2b(data, digest_size=16).digest(), tuple(blob.shape), bool(apply_features))
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit.clone()
        out = self.arcface(blob, apply_features=apply_features)
        with self._lock:
            self.passes += 1
            self._cache[key] = out.detach().clone()
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
        return out


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules hold the same tensors under the same names (compared exactly)."""
    left, right = a.state_dict(), b.state_dict()
    if left.keys() != right.keys():
        return False
    return all(
        left[k].shape == right[k].shape and left[k].dtype == right[k].dtype and torch.equal(left[k], right[k])
        for k in left
    )


def share_identical_arcface(idgen: IdGen, idrank: IdRank) -> str:
    """Give IdGen and IdRank one cached ArcFace when, and only when, their checkpoints' ArcFace weights are
    identical (compared tensor by tensor at load). The official IdGen and IdRank weights differ, so
    usually nothing is shared. Returns the backend's ``arcface_shared`` detail."""
    if not same_weights(idgen.arcface, idrank.arcface):
        return "no (IdGen and IdRank ArcFace weights differ)"
    shared = SharedArcFace(idgen.arcface)
    idgen.add_module("arcface", shared)  # replaces the registered submodule (same attribute name)
    idrank.add_module("arcface", shared)
    return "yes (identical weights: one ArcFace pass per face)"


def _step_check(stop_check: StopCheck) -> Callable[[object], None]:
    """The sampler's per-step callback that runs ``stop_check`` (its exception ends the sampling loop)."""
    def after_step(_state: object) -> None:
        stop_check()

    return after_step


def flame_fusion_setup(directory: Path) -> FusionSetup:
    """The flame pack's fusion setup: FLAME 2020's linear shape space, its masks as regions, 68 + 7 keypoints."""
    from facefuse.assets.flame_file import load_flame_masks
    from facefuse.assets.registry import asset_path
    from facefuse.fusion.space import ShapeSpace
    from facefuse.fusion.strategies import DEFAULT_STRATEGY
    from facefuse.models.flame import NOW7_FROM_LMK68

    flame = load_flame(directory)
    masks_path = asset_path(directory, "flame_masks")
    regions = load_flame_masks(masks_path, num_vertices=flame.num_vertices) if masks_path.is_file() else {}
    space = ShapeSpace.from_flame(flame, regions)
    landmarks = landmark_function(flame)

    def keypoints(vertices_mm: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        lmk68 = landmarks(vertices_mm)
        return lmk68, lmk68[list(NOW7_FROM_LMK68)]

    from facefuse.assets.flame_file import load_mediapipe_embedding
    from facefuse.packs.posed import FlamePosedFitter

    # Optional: the dense MediaPipe embedding, when the user has it (validated; a bad file is an AssetError).
    mediapipe_path = asset_path(directory, "mediapipe_embedding")
    mediapipe = (load_mediapipe_embedding(mediapipe_path, num_faces=flame.faces.shape[0])
                 if mediapipe_path.is_file() else None)
    fitter = FlamePosedFitter(flame, mediapipe=mediapipe)
    dense = f" + {len(mediapipe.landmark_indices)} MediaPipe points" if mediapipe is not None else ""
    details = {"regions": ",".join(sorted(space.regions)) or "none (region strategy unavailable)",
               "posed_fit": f"FLAME expression ({fitter.num_expression}), jaw, head pose, camera; "
                            f"68 landmarks (dynamic contour){dense}"}
    return FusionSetup(
        space,
        BackendStatus("fusion", "flame2020-linear", "flame", True, False, "ready", details=details),
        keypoints,
        DEFAULT_STRATEGY,
        posed_fitter=lambda shape, _vertices, target: fitter(shape, target),
    )
