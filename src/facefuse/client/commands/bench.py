"""``facefuse bench``: methods and fusion strategies compared through the mesh (docs/evaluation.md).

``bench now`` predicts the NoW images with each method/strategy and evaluates each with the built-in
NoW evaluation; ``bench occlusion`` measures how far each method's shape moves when the photo is
occluded. Both cache the branch outputs under OUT/cache, so reruns resume and adding a strategy only
costs fusion calls (steering strategies excepted: they go through the gateway again).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from facefuse.errors import InvalidInputError
from facefuse.face.types import det_thresh_argument

if TYPE_CHECKING:
    from facefuse.client.bench.connection import MeshConnection
    from facefuse.client.bench.entries import SamplingSettings

DEFAULT_METHODS = "mica,ofer,fuse"


def _mesh_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--gateway", metavar="HOST:PORT", help="a running mesh's gateway")
    where.add_argument("--local", action="store_true", help="start the mesh as local processes for the run")
    parser.add_argument("--fusion", metavar="HOST:PORT",
                        help="the fusion service, for re-fusing cached branches (default with --local: the local one)")
    parser.add_argument(
        "--assets", default=None, help="with --local: the official files folder (default $FACEFUSE_ASSETS)"
    )
    parser.add_argument("--pack", default="auto", choices=["auto", "flame", "open"], help="with --local: model pack")
    parser.add_argument(
        "--methods", default=DEFAULT_METHODS, help="comma list of mica, ofer, fuse (default %(default)s)"
    )
    parser.add_argument("--strategies", default="",
                        help="comma list of fusion strategies for method fuse (default: the fusion service's default)")
    parser.add_argument("--option", action="append", default=[], help="strategy option NAME=NUMBER, repeatable")
    parser.add_argument("--samples", type=int, default=10, help="OFER samples per face (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    parser.add_argument(
        "--steps", type=int, default=0, help="sampler steps for the fast sampler (default: the service's)"
    )
    parser.add_argument("--sampler", default="", choices=["", "fast", "official"], help="IdGen sampler")
    parser.add_argument("--timeout", type=float, default=None, help="deadline per gateway stream, seconds")
    parser.add_argument("--det-thresh", type=det_thresh_argument, default=None, metavar="T",
                        help="face detector score threshold sent with every image, 0 < T < 1 (default: the gateway's)")
    parser.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                        help="NoW evaluation worker processes (default %(default)s)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder (reruns resume in it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench now`` and ``bench occlusion`` to the CLI's subparsers."""
    parser = subparsers.add_parser("bench", help="compare methods and fusion strategies (NoW, occlusion)")
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    sub.required = True

    now = sub.add_parser("now", help="NoW error per method/strategy, one table",
                         description="Run the NoW images through the mesh with each method/strategy, write the "
                                     "predictions in the NoW layout, evaluate each and compare them in one table "
                                     "(OUT/bench_now.json, .csv).")
    now.add_argument("--dataset", required=True, type=Path, metavar="NOW_DIR", help="the NoW download folder")
    now.add_argument("--split", choices=["val", "test"], default="val", help="image list (default %(default)s)")
    now.add_argument("--challenge", choices=["all", "neutral", "expression", "occlusion", "selfie"], default="all",
                     help="one challenge only (default %(default)s)")
    now.add_argument("--per-challenge", action="store_true", help="also median/mean/std per challenge in the table")
    now.add_argument("--metrical", action="store_true", help="metrical variant (predictions are in mm)")
    now.add_argument("--limit", type=int, default=None, help="only the first N listed images (quick looks)")
    now.add_argument("--tune", action="store_true",
                     help="search fusion strategy and options on the validation split (cached branches) and write "
                          "a fusion profile for the fusion service's --fusion-profile; --methods/--strategies are "
                          "not used")
    now.add_argument("--profile-out", type=Path, default=None, metavar="PATH",
                     help="with --tune: where to write the profile (default OUT/fusion_profile.json)")
    _mesh_arguments(now)
    now.set_defaults(func=cmd_bench_now)

    occ = sub.add_parser("occlusion", help="how far each method's shape moves under occlusion",
                         description="Make deterministic occluded variants of face photos, run each method/strategy "
                                     "on the clean and occluded photos and report the mean vertex distance (mm) to "
                                     "the method's own clean result, overall and per region "
                                     "(OUT/bench_occlusion.json, .csv).")
    occ.add_argument("--images", required=True, nargs="+", metavar="PATH", help="photos: files, folders or patterns")
    occ.add_argument(
        "--kinds", default="mask,band,hand,rect", help="occluders: mask, band, hand, rect (default %(default)s)"
    )
    occ.add_argument("--coverage", default="0.1,0.2,0.3", help="coverage levels of hand and rect (default %(default)s)")
    occ.add_argument("--now-dataset", type=Path, default=None, metavar="NOW_DIR",
                     help="NoW folder: photos that are NoW images also get their NoW error per level")
    occ.add_argument("--split", choices=["val", "test"], default="val", help="NoW image list (default %(default)s)")
    occ.add_argument("--oracle-mask", action="store_true",
                     help="send each occluder's true mask to the gateway (visibility from the mask, not estimated)")
    _mesh_arguments(occ)
    occ.set_defaults(func=cmd_bench_occlusion)


def _sampling(args: argparse.Namespace) -> SamplingSettings:
    from facefuse.client.bench.entries import SamplingSettings
    from facefuse.client.options import parse_option

    if args.samples < 1:
        raise InvalidInputError(f"--samples must be at least 1, got {args.samples}")
    if args.workers < 1:
        raise InvalidInputError(f"--workers must be at least 1, got {args.workers}")
    options = tuple(sorted(dict(parse_option(o) for o in args.option).items()))
    return SamplingSettings(num_samples=args.samples, seed=args.seed, steps=args.steps, sampler=args.sampler,
                            strategy_options=options)


def _connection(args: argparse.Namespace) -> MeshConnection:
    from facefuse.client.bench.connection import MeshConnection

    return MeshConnection(gateway=args.gateway, fusion=args.fusion, local=bool(args.local), assets=args.assets,
                          pack=args.pack, timeout_s=args.timeout, det_thresh=args.det_thresh)


def _print_summary(summary: dict, title: str) -> None:
    print(title)
    print(summary["table"])
    steered = [name for name, e in summary.get("entries", {}).items() if "gateway again" in e.get("source", "")]
    if steered:
        print(
            f"note: {', '.join(steered)} steer the sampler/ranker with MICA's shape, "
            "so they ran through the gateway again"
        )
    counters = summary["counters"]
    print(f"gateway images: {counters['gateway_images']}, fusion calls: {counters['fusion_calls']}, "
          f"from cache: {counters['cached_items']}, failed: {counters['failed_items']}")
    for note in summary.get("notes", [])[:10]:
        print(f"note: {note}", file=sys.stderr)
    print(f"written: {summary['files']['csv']}, {summary['files']['json']}")


def cmd_bench_now(args: argparse.Namespace) -> int:
    from facefuse.client.bench.entries import parse_list
    from facefuse.client.bench.now import NowBenchConfig, run_now_bench

    if args.tune:
        return _tune(args)
    if args.profile_out is not None:
        raise InvalidInputError("--profile-out is only used with --tune")

    config = NowBenchConfig(
        dataset=args.dataset,
        out=args.out,
        methods=tuple(parse_list(args.methods)),
        strategies=tuple(parse_list(args.strategies)),
        split=args.split,
        challenge=args.challenge,
        per_challenge=bool(args.per_challenge),
        metrical=bool(args.metrical),
        sampling=_sampling(args),
        workers=args.workers,
        limit=args.limit,
        progress=not args.no_progress,
    )
    with _connection(args) as conn:
        summary = run_now_bench(config, conn)
    variant = "metrical" if args.metrical else "non-metrical"
    topology = ", ".join(summary["topology"])
    _print_summary(summary, f"NoW {args.split} {variant} ({args.challenge}), errors in mm, topology {topology}:")
    incomplete = [name for name, e in summary["entries"].items() if e["n_images_evaluated"] < e["n_images_listed"]]
    if incomplete:
        print(f"facefuse: some images were not evaluated for {', '.join(incomplete)}; see {summary['files']['json']}",
              file=sys.stderr)
        return 1
    return 0


def _tune(args: argparse.Namespace) -> int:
    from facefuse.client.bench.tune import NowTuneConfig, run_now_tune

    config = NowTuneConfig(dataset=args.dataset, out=args.out, profile=args.profile_out, split=args.split,
                           challenge=args.challenge, metrical=bool(args.metrical), sampling=_sampling(args),
                           limit=args.limit, progress=not args.no_progress)
    with _connection(args) as conn:
        summary = run_now_tune(config, conn)
    chosen, selection = summary["chosen"], summary["selection"]
    print(f"Fusion tuning on NoW {args.split} ({args.challenge}): tuned on {summary['tuned_on']}. Errors in mm.")
    print(summary["table"])
    gap = selection["gap_closed"]
    print("IdRank selection: median ranked {:.4f}, random {:.4f}, oracle {:.4f} mm; ranking closes {} of the "
          "random -> oracle gap".format(selection["ranked"]["median_mm"] or float("nan"),
                                        selection["random"]["median_mm"] or float("nan"),
                                        selection["oracle"]["median_mm"] or float("nan"),
                                        "n/a" if gap is None else f"{100 * gap:.0f}%"))
    options = ", ".join(f"{k}={v:g}" for k, v in sorted(chosen["options"].items())) or "defaults"
    print(f"chosen: {chosen['strategy']} ({options}), validation median {chosen['median_mm']:.4f} mm")
    print(f"profile: {summary['profile']} (start the fusion service with --fusion-profile {summary['profile']})")
    print(f"written: {summary['files']['csv']}, {summary['files']['json']}")
    return 0


def cmd_bench_occlusion(args: argparse.Namespace) -> int:
    from facefuse.client.bench.entries import parse_list
    from facefuse.client.bench.occlusion import OcclusionBenchConfig, run_occlusion_bench

    try:
        coverages = tuple(float(c) for c in parse_list(args.coverage))
    except ValueError:
        raise InvalidInputError(f"--coverage {args.coverage!r}: expected numbers like 0.1,0.2,0.3") from None
    config = OcclusionBenchConfig(images=tuple(args.images), out=args.out, methods=tuple(parse_list(args.methods)),
                                  strategies=tuple(parse_list(args.strategies)), kinds=tuple(parse_list(args.kinds)),
                                  coverages=coverages, seed=args.seed, sampling=_sampling(args),
                                  now_dataset=args.now_dataset, split=args.split, oracle_mask=bool(args.oracle_mask),
                                  assets=args.assets, workers=args.workers, progress=not args.no_progress)
    with _connection(args) as conn:
        summary = run_occlusion_bench(config, conn)
    _print_summary(summary, "Occlusion: mean vertex distance (mm) to each method's own clean result "
                            f"(regions: {'; '.join(f'{k}: {v}' for k, v in summary['regions'].items()) or 'none'}):")
    if summary.get("now_table"):
        print("NoW error (mm) per occlusion level:")
        print(summary["now_table"])
    failed = [r for r in summary["per_image"] if "error" in r]
    if failed:  # a face lost under an occluder is a finding, not a failed run
        print(
            f"{len(failed)} prediction(s) missing "
            f"(e.g. {failed[0]['image']} {failed[0]['variant']}: {failed[0]['error']}); "
            f"see {summary['files']['json']}"
        )
    return 0
