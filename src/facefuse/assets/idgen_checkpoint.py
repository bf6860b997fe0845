"""Loading and validating OFER's ``model_idgen_flame20.tar``, and the q/k/v projections it lacks.

Sections and how they are matched. The official loader reads whichever of the four sections the file
has (``net`` and ``diffusion`` with ``strict=False``); facefuse accepts the same layouts, but checks
every key it reads and names what no section supplies:

* ``arcface`` -> IResNet-100 (925 keys): required, nothing else holds these weights;
* ``net`` -> Unet (174 keys) and/or ``diffusion``'s ``net.*`` keys; diffusion is loaded last and wins,
  as in the official order. Together they must cover every Unet key. The 6 stray
  ``<block>.fn.fn.qkv.weight`` keys a state dict saved after any forward pass contains (each is only
  the last of the 16 random convs of the training run; the official loader ignores them too) are
  checked for shape, then dropped and reported; any other unknown key is an error;
* ``var_sched`` (17 buffers) and/or ``diffusion``'s ``var_sched.*``: the linear schedule is a formula,
  so absent buffers are computed; present ones are checked for shape, dtype and finiteness, and a
  value that differs from the formula is reported (the samplers rebuild the schedule from the formula,
  as the official sampler does, so it cannot change the samples).

The 6x16 q/k/v projections were never saved (see ``facefuse.models.idgen``). Two sources:

* ``"default"``: facefuse's documented, versioned stand-in (``facefuse-qkv-v1``): PyTorch's default
  Conv1d init distribution drawn from ``torch.Generator().manual_seed(seed)`` in official block order.
  It is *not* the official network; samples differ from the official ones.
* ``"reproduce-official"``: replays the official construction RNG sequence (torch.manual_seed(1), then
  every module the official test script builds before IdGen's Unet) and captures the Unet's draws. See
  :func:`official_projections` for what is and is not verified.
* or a path to a projections file (e.g. exported from an official run) in the format of
  :func:`save_projections`.

Computed projections can be cached under ``$FACEFUSE_HOME/idgen`` (default ``~/.cache/facefuse``) with
their sha256.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from facefuse.assets.checkpoint_io import (
    check_state_dict,
    expected_state,
    load_checkpoint,
    load_strict,
)
from facefuse.errors import AssetError, CheckpointError
from facefuse.io.atomic import atomic_open
from facefuse.models.diffusion import VarianceSchedule
from facefuse.models.idgen import (
    ATTENTION_BLOCK_DIMS,
    ATTENTION_BLOCK_NAMES,
    ATTENTION_HIDDEN,
    NUM_PROJECTIONS,
    IdGen,
    IdGenUnet,
    draw_default_projections,
)

log = logging.getLogger(__name__)

IDGEN_SECTIONS = ("arcface", "net", "var_sched", "diffusion")
STRAY_QKV_SUFFIX = ".fn.fn.qkv.weight"

DEFAULT_PROJECTIONS_VERSION = "facefuse-qkv-v1"
DEFAULT_PROJECTIONS_SEED = 0
OFFICIAL_PROJECTIONS_VERSION = "ofer-official-replay-v1"
OFFICIAL_SEED = 1
HOME_ENV = "FACEFUSE_HOME"
PROJECTIONS_FORMAT = "facefuse-idgen-qkv-projections"


# --- the IdGen model --------------------------------------------------------------------------------
class _DiffusionSection(nn.Module):
    """The official ``FlameParamDiffusion`` key layout (``net.*``, ``var_sched.*``) over shared modules."""

    def __init__(self, net: nn.Module, var_sched: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.var_sched = var_sched


def _new_arcface() -> nn.Module:
    from facefuse.models.arcface import IResNet100

    return IResNet100()


def _skeleton() -> tuple[nn.Module, IdGenUnet, VarianceSchedule]:
    """Modules with the right structure and no values (meta device: no memory, no RNG consumed)."""
    with torch.device("meta"):
        arcface = _new_arcface()
        net = IdGenUnet()
    return arcface, net, VarianceSchedule()


def _split_stray_qkv(
    state: Mapping[str, Any], prefix: str, dims: Mapping[str, int], source: str
) -> tuple[dict[str, Any], list[str]]:
    """Remove the 6 documented stray ``qkv.weight`` keys (shape-checked); everything else stays for strict checking."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: expected a state dict, found {type(state).__name__}")
    clean = dict(state)
    dropped: list[str] = []
    for name, dim in dims.items():
        key = f"{prefix}{name}{STRAY_QKV_SUFFIX}"
        if key not in clean:
            continue
        value = clean.pop(key)
        expected = (3 * ATTENTION_HIDDEN, dim, 1)
        if not isinstance(value, Tensor) or tuple(value.shape) != expected:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise CheckpointError(f"{source}: {key!r}: shape {shape}, expected {expected}")
        dropped.append(key)
    if dropped and len(dropped) != len(dims):
        missing = [f"{prefix}{n}{STRAY_QKV_SUFFIX}" for n in dims if f"{prefix}{n}{STRAY_QKV_SUFFIX}" not in dropped]
        raise CheckpointError(f"{source}: has {len(dropped)} of the 6 stray q/k/v keys; missing "
                              f"{missing} (expected all or none)")
    return clean, dropped


@dataclass
class _Resolved:
    """What a file supplies, after merging its sections the way the official loader does."""

    arcface: Mapping[str, Any]
    unet: dict[str, Any]  # 'net' overlaid by diffusion's net.* (diffusion is loaded last and wins)
    var_sched: dict[str, Any]  # formula, overlaid by 'var_sched', then by diffusion's var_sched.*
    present: dict[str, int]  # section -> key count (after dropping stray q/k/v keys)
    dropped: list[str]
    derived: list[str]  # var_sched buffers computed from the linear formula (absent from the file)
    differing: int  # tensors where 'net' and diffusion's net.* disagree
    notes: list[str]


def _check_present(expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]], state: Mapping[str, Any],
                   source: str) -> None:
    """Shapes and dtypes of the keys a section has; unknown keys are errors, absent ones are not (yet)."""
    check_state_dict({k: v for k, v in expected.items() if k in state}, state, source)


def _resolve(checkpoint: Mapping[str, Any], path: Path, dims: Mapping[str, int]) -> _Resolved:
    """Accept any subset of the four sections, as the official loader does; derive, verify, or name the gap.

    ``arcface`` cannot come from anywhere else. The Unet comes from ``net`` and/or diffusion's ``net.*``
    (together complete). The schedule is a formula: absent buffers are computed, present ones checked.
    """
    if "arcface" not in checkpoint:
        raise CheckpointError(
            f"{path}: missing section 'arcface' (IdGen's ArcFace weights; nothing else in the file holds "
            f"them); the file has {sorted(map(str, checkpoint))}"
        )
    for name in IDGEN_SECTIONS:
        if name in checkpoint and not isinstance(checkpoint[name], Mapping):
            raise CheckpointError(f"{path}: section {name!r} is a {type(checkpoint[name]).__name__}, "
                                  "expected a state dict")
    arcface_skeleton, net_skeleton, schedule = _skeleton()
    net, net_dropped = _split_stray_qkv(checkpoint.get("net", {}), "", dims, f"{path} [net]")
    diffusion, diffusion_dropped = _split_stray_qkv(checkpoint.get("diffusion", {}), "net.", dims,
                                                    f"{path} [diffusion]")
    unet_expected = expected_state(net_skeleton)
    sched_expected = expected_state(schedule)
    _check_present(expected_state(arcface_skeleton), checkpoint["arcface"], f"{path} [arcface]")
    _check_present(unet_expected, net, f"{path} [net]")
    _check_present(sched_expected, checkpoint.get("var_sched", {}), f"{path} [var_sched]")
    _check_present(expected_state(_DiffusionSection(net_skeleton, schedule)), diffusion, f"{path} [diffusion]")
    diffusion_net = {k.removeprefix("net."): v for k, v in diffusion.items() if k.startswith("net.")}
    diffusion_sched = {k.removeprefix("var_sched."): v for k, v in diffusion.items() if k.startswith("var_sched.")}
    if not net and not diffusion_net:
        raise CheckpointError(
            f"{path}: no Unet weights: neither a 'net' section nor 'net.*' keys in a 'diffusion' section; "
            f"the file has {sorted(map(str, checkpoint))}"
        )
    unet = {**net, **diffusion_net}
    missing = [k for k in unet_expected if k not in unet]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: Unet key(s) {shown} are in neither 'net' nor 'diffusion' (net.*)")
    formula = schedule.state_dict()
    file_sched = {**checkpoint.get("var_sched", {}), **diffusion_sched}
    notes: list[str] = []
    for key, value in file_sched.items():
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path} [var_sched]: {key!r} has non-finite values")
        if not torch.allclose(value, formula[key], rtol=1e-6, atol=0.0):
            notes.append(f"var_sched {key!r} differs from the linear schedule (sampling rebuilds it from the formula)")
    present = {name: len(checkpoint[name]) for name in IDGEN_SECTIONS if name in checkpoint}
    present.update({name: len(state) for name, state in (("net", net), ("diffusion", diffusion)) if name in present})
    return _Resolved(
        arcface=checkpoint["arcface"], unet=unet, var_sched={**formula, **file_sched}, present=present,
        dropped=net_dropped + diffusion_dropped, derived=[k for k in formula if k not in file_sched],
        differing=_differing_tensors(net, diffusion), notes=notes,
    )


def _differing_tensors(net: Mapping[str, Any], diffusion: Mapping[str, Any]) -> int:
    return sum(
        1
        for key, value in net.items()
        if isinstance(value, Tensor) and not torch.equal(value, diffusion.get(f"net.{key}", value))
    )


def _describe(resolved: _Resolved) -> str:
    sections = ", ".join(f"{name} {count}" for name, count in resolved.present.items())
    absent = [name for name in IDGEN_SECTIONS if name not in resolved.present]
    parts = [f"OFER IdGen checkpoint: sections {sections} (keys)"]
    if resolved.dropped:
        parts.append(f"{len(resolved.dropped)} stray qkv.weight keys ignored")
    if absent:
        parts.append(f"absent (as the official loader allows): {', '.join(absent)}")
    if resolved.derived:
        parts.append(f"{len(resolved.derived)} var_sched buffers computed from the linear schedule")
    if "net" in resolved.present and "diffusion" in resolved.present:
        parts.append("net and diffusion agree" if resolved.differing == 0
                     else f"net and diffusion differ in {resolved.differing} tensors (diffusion wins)")
    parts += resolved.notes
    return "; ".join(parts)


def validate_idgen_checkpoint(path: Path) -> str:
    """One-line description of a valid ``model_idgen_flame20.tar``; raises CheckpointError naming the fault."""
    path = Path(path)
    resolved = _resolve(load_checkpoint(path), path, ATTENTION_BLOCK_DIMS)
    arcface, net, var_sched = _skeleton()
    check_state_dict(expected_state(arcface), resolved.arcface, f"{path} [arcface]")
    check_state_dict(expected_state(net), resolved.unet, f"{path} [net + diffusion]")
    check_state_dict(expected_state(var_sched), resolved.var_sched, f"{path} [var_sched]")
    return _describe(resolved)


def load_idgen(
    path: str | os.PathLike[str],
    *,
    projections: str | os.PathLike[str] = "default",
    device: str | torch.device = "cpu",
    seed: int = DEFAULT_PROJECTIONS_SEED,
    cache: bool = False,
) -> IdGen:
    """Build an eval-mode :class:`IdGen` from the official checkpoint, strictly, plus q/k/v projections.

    ``projections``: ``"default"`` (facefuse-qkv-v1 with ``seed``), ``"reproduce-official"`` (RNG replay,
    cached under FACEFUSE_HOME when ``cache``), or a path to a projections file. The returned model's
    ``load_report`` says which keys were dropped, what was derived and where the projections came from.
    """
    path = Path(path)
    arcface, net, var_sched = _skeleton()
    arcface = arcface.to_empty(device=device)
    net = net.to_empty(device=device)
    var_sched = var_sched.to(device)
    resolved = _resolve(load_checkpoint(path), path, ATTENTION_BLOCK_DIMS)
    # Official order: arcface, net, var_sched, then diffusion; _resolve has already overlaid them in that order.
    load_strict(arcface, resolved.arcface, f"{path} [arcface]")
    load_strict(net, resolved.unet, f"{path} [net + diffusion]")
    load_strict(var_sched, resolved.var_sched, f"{path} [var_sched]")
    if resolved.dropped:
        log.info("%s: ignored %d stray q/k/v keys saved by the official training run: %s",
                 path, len(resolved.dropped), resolved.dropped)
    for note in resolved.notes:
        log.warning("%s: %s", path, note)
    weights, provenance = resolve_projections(projections, seed=seed, cache=cache)
    net.set_projections(weights)
    model = IdGen(arcface, net, var_sched).eval()
    model.load_report = {
        "checkpoint": str(path),
        "sections": sorted(resolved.present),
        "dropped_keys": list(resolved.dropped),
        "derived_var_sched": list(resolved.derived),
        "net_diffusion_differing_tensors": resolved.differing,
        "notes": list(resolved.notes),
        "projections": provenance,
    }
    return model


# --- the q/k/v projections --------------------------------------------------------------------------
def facefuse_home() -> Path:
    """facefuse's cache folder: ``$FACEFUSE_HOME`` or ``~/.cache/facefuse``."""
    value = os.environ.get(HOME_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "facefuse"


def projections_cache_path(version: str, seed: int) -> Path:
    return facefuse_home() / "idgen" / f"{version}-seed{seed}.pt"


def projections_sha256(projections: Mapping[str, Tensor]) -> str:
    """sha256 over block names and float32 little-endian bytes, in official block order."""
    digest = hashlib.sha256()
    for name in ATTENTION_BLOCK_NAMES:
        digest.update(name.encode())
        digest.update(projections[name].detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return digest.hexdigest()


def default_projections(seed: int = DEFAULT_PROJECTIONS_SEED) -> dict[str, Tensor]:
    """facefuse-qkv-v1: PyTorch's default Conv1d init drawn from a generator seeded with ``seed``."""
    return draw_default_projections(torch.Generator().manual_seed(seed))


def save_projections(
    path: str | os.PathLike[str], projections: Mapping[str, Tensor], *, version: str, seed: int
) -> str:
    """Write projections with their version, seed and sha256, atomically; returns the sha256."""
    path = Path(path)
    sha = projections_sha256(projections)
    payload = {
        "format": PROJECTIONS_FORMAT,
        "version": version,
        "seed": int(seed),
        "sha256": sha,
        "projections": {
            name: projections[name].detach().to("cpu", torch.float32).contiguous() for name in ATTENTION_BLOCK_NAMES
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)
    return sha


def load_projections(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a projections file, check names, shapes and sha256; returns (projections, provenance)."""
    path = Path(path)
    payload = load_checkpoint(path)
    if payload.get("format") != PROJECTIONS_FORMAT:
        raise AssetError(f"{path}: not a facefuse q/k/v projections file (format {payload.get('format')!r})")
    weights = payload.get("projections")
    if not isinstance(weights, Mapping):
        raise AssetError(f"{path}: no 'projections' mapping")
    expected = {
        name: ((NUM_PROJECTIONS, 3 * ATTENTION_HIDDEN, dim), torch.float32)
        for name, dim in ATTENTION_BLOCK_DIMS.items()
    }
    check_state_dict(expected, weights, f"{path} [projections]")
    sha = projections_sha256(weights)
    if sha != payload.get("sha256"):
        raise AssetError(f"{path}: sha256 mismatch (stored {payload.get('sha256')}, computed "
                         f"{sha}); the file is corrupt")
    return dict(weights), {
        "source": str(path),
        "version": payload.get("version"),
        "seed": payload.get("seed"),
        "sha256": sha,
    }


def resolve_projections(
    projections: str | os.PathLike[str], *, seed: int = DEFAULT_PROJECTIONS_SEED, cache: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(projections, provenance) for ``"default"``, ``"reproduce-official"`` or a file path."""
    if projections == "default":
        version, make, used_seed = DEFAULT_PROJECTIONS_VERSION, (lambda: default_projections(seed)), seed
    elif projections == "reproduce-official":
        version, make, used_seed = OFFICIAL_PROJECTIONS_VERSION, official_projections, OFFICIAL_SEED
    else:
        return load_projections(projections)
    cached = projections_cache_path(version, used_seed)
    if cache and cached.is_file():
        weights, provenance = load_projections(cached)
        if provenance["version"] == version:
            return weights, provenance
    weights = make()
    sha = save_projections(cached, weights, version=version, seed=used_seed) if cache else projections_sha256(weights)
    return weights, {"source": "computed", "version": version, "seed": used_seed, "sha256": sha}


def _replay_official_program(seed: int, *, to_first_sampling: bool = True) -> tuple[dict[str, Tensor], Tensor]:
    """(IdGen's q/k/v projections, global RNG state) of the official program: the state when it first
    samples, or right after IdGen's Unet when not ``to_first_sampling``.

    Builds every module the official test program builds, in its order, on the global RNG seeded with
    ``seed``, inside a forked RNG so the caller's state is untouched. See :func:`official_projections`.
    """
    from facefuse.models.arcface import IResNet100
    from facefuse.models.clip_vit import ClipViT
    from facefuse.models.idrank import RankMLPNet

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        # IdRank: clip.load (FaRL's CLIP), ArcFace, RankMLPNet, its unused internal diffusion model
        # (ArcFace + Unet); TesterRank: FLAME (no draws); IdGen model1: ArcFace, then the captured Unet.
        for build in (ClipViT, IResNet100, RankMLPNet, IResNet100, IdGenUnet, IResNet100):
            module = build()
            del module
        projections = IdGenUnet().get_projections()
        if to_first_sampling:
            ClipViT()  # Tester2.__init__ calls clip.load again before anything samples (FaRL loads draw nothing)
        return projections, torch.random.get_rng_state()


@functools.lru_cache(maxsize=8)
def official_sampling_state(seed: int) -> Tensor:
    """The global torch CPU RNG state the official program, run with ``seed_everything(seed)``, has when it
    first samples (gen_mod ``test_amiya.py`` = OFER ``test.py``: the first ``FlameParamDiffusion.sample``
    of the first image, which draws x_T = randn(B, 300) and then one normal(B, 300) per step).

    Takes a few seconds (every module is really built); cached per seed for the process.
    """
    return _replay_official_program(int(seed))[1].clone()


def official_projections() -> dict[str, Tensor]:
    """Replay the official construction RNG sequence and return IdGen's 6x16 q/k/v weights.

    Sequence (gen_mod ``test_amiya.py`` = OFER ``test.py``; construction facts read from
    prathebaselva/OFER ``src/models/...`` and openai/CLIP ``clip/model.py``):
    ``torch.manual_seed(1)``; IdRank: CLIP ViT-B/16 (constructor + ``initialize_parameters``), ArcFace
    IResNet-100 (default inits + conv re-init), RankMLPNet, then its internal unused
    FlameParamDiffusionModel: IResNet-100 and a full Unet (its own 6x16 q/k/v); FLAME and checkpoint
    loads draw nothing; then IdGen: IResNet-100, then the Unet whose draws are captured.

    Runs in a forked RNG so the caller's global state is untouched. Takes ~5 s and ~1.5 GB transiently
    (every module is really built, since its draws matter).

    Verified: the order above against gen_mod ``test_amiya.py``, OFER's FlameParamRankModel /
    FlameParamDiffusionModel / BaseModel constructors and gen_mod's TesterRank constructor (FLAME only);
    IdGenUnet's construction consumes the RNG exactly like an independent shadow of the official Unet
    (tests). Relied on, not verified here: the RNG fidelity of ClipViT, IResNet100 and RankMLPNet (their
    modules document it), that FLAME construction draws nothing, and the torch version (init algorithms
    may change across versions). Never compared with an official run (none is available).
    """
    return _replay_official_program(OFFICIAL_SEED, to_first_sampling=False)[0]
