"""Loading and validating OFER's ``model_idgen_flame20.tar``, and the q/k/v projections it lacks.

Sections and how they are matched (the official loader is lenient in two places; here every section
is strict, with one documented exception):

* ``arcface`` -> IResNet-100, strict (925 keys);
* ``net`` -> Unet, strict (174 keys) after accepting the 6 stray ``<block>.fn.fn.qkv.weight`` keys a
  state dict saved after any forward pass contains (each is only the last of the 16 random convs of the
  training run; the official loader ignores them too). They are checked for shape, then dropped and
  reported; any other extra or missing key is an error;
* ``var_sched`` -> schedule, strict (17 buffers);
* ``diffusion`` -> ``net.`` + ``var_sched.`` of the same modules, strict with the same exception. It is
  loaded last, so its values win, as in the official load order.

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

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from facefuse.assets.checkpoint_io import (
    check_state_dict,
    expected_state,
    load_checkpoint,
    load_strict,
    require_sections,
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


def _sections(checkpoint: Mapping[str, Any], path: Path, dims: Mapping[str, int]) -> dict[str, Any]:
    require_sections(checkpoint, IDGEN_SECTIONS, str(path))
    net, net_dropped = _split_stray_qkv(checkpoint["net"], "", dims, f"{path} [net]")
    diffusion, diffusion_dropped = _split_stray_qkv(checkpoint["diffusion"], "net.", dims, f"{path} [diffusion]")
    return {
        "arcface": checkpoint["arcface"],
        "net": net,
        "var_sched": checkpoint["var_sched"],
        "diffusion": diffusion,
        "dropped": net_dropped + diffusion_dropped,
    }


def _differing_tensors(net: Mapping[str, Any], diffusion: Mapping[str, Any]) -> int:
    return sum(
        1
        for key, value in net.items()
        if isinstance(value, Tensor) and not torch.equal(value, diffusion.get(f"net.{key}", value))
    )


def validate_idgen_checkpoint(path: Path) -> str:
    """One-line description of a valid ``model_idgen_flame20.tar``; raises CheckpointError naming the fault."""
    path = Path(path)
    arcface, net, var_sched = _skeleton()
    dims = ATTENTION_BLOCK_DIMS
    sections = _sections(load_checkpoint(path), path, dims)
    check_state_dict(expected_state(arcface), sections["arcface"], f"{path} [arcface]")
    check_state_dict(expected_state(net), sections["net"], f"{path} [net]")
    check_state_dict(expected_state(var_sched), sections["var_sched"], f"{path} [var_sched]")
    check_state_dict(expected_state(_DiffusionSection(net, var_sched)), sections["diffusion"], f"{path} [diffusion]")
    for key, value in sections["var_sched"].items():
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path} [var_sched]: {key!r} has non-finite values")
    stray = len(sections["dropped"])
    differing = _differing_tensors(sections["net"], sections["diffusion"])
    agreement = (
        "net and diffusion agree"
        if differing == 0
        else f"net and diffusion differ in {differing} tensors (diffusion wins)"
    )
    return (
        f"OFER IdGen checkpoint: arcface {len(sections['arcface'])} keys, net {len(sections['net'])}, "
        f"var_sched {len(sections['var_sched'])}, diffusion {len(sections['diffusion'])}"
        f"{f' ({stray} stray qkv.weight keys ignored)' if stray else ''}; {agreement}"
    )


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
    ``load_report`` says which keys were dropped and where the projections came from.
    """
    path = Path(path)
    arcface, net, var_sched = _skeleton()
    arcface = arcface.to_empty(device=device)
    net = net.to_empty(device=device)
    var_sched = var_sched.to(device)
    dims = ATTENTION_BLOCK_DIMS
    sections = _sections(load_checkpoint(path), path, dims)
    # Official order: arcface, net, var_sched, then diffusion (which overrides net and var_sched).
    load_strict(arcface, sections["arcface"], f"{path} [arcface]")
    load_strict(net, sections["net"], f"{path} [net]")
    load_strict(var_sched, sections["var_sched"], f"{path} [var_sched]")
    load_strict(_DiffusionSection(net, var_sched), sections["diffusion"], f"{path} [diffusion]")
    if sections["dropped"]:
        log.info(
            "%s: ignored %d stray q/k/v keys saved by the official training run: %s",
            path,
            len(sections["dropped"]),
            sections["dropped"],
        )
    weights, provenance = resolve_projections(projections, seed=seed, cache=cache)
    net.set_projections(weights)
    model = IdGen(arcface, net, var_sched).eval()
    model.load_report = {
        "checkpoint": str(path),
        "dropped_keys": list(sections["dropped"]),
        "net_diffusion_differing_tensors": _differing_tensors(sections["net"], sections["diffusion"]),
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
    from facefuse.models.arcface import IResNet100
    from facefuse.models.clip_vit import ClipViT
    from facefuse.models.idrank import RankMLPNet

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(OFFICIAL_SEED)
        for build in (ClipViT, IResNet100, RankMLPNet, IResNet100, IdGenUnet, IResNet100):
            module = build()
            del module
        unet = IdGenUnet()
        return unet.get_projections()
