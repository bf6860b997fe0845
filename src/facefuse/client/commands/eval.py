"""``facefuse eval``: benchmarks run locally. ``eval now`` is the NoW protocol (see docs/evaluation.md)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from facefuse.errors import InvalidInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` and its subcommands to the CLI's subparsers."""
    parser = subparsers.add_parser("eval", help="evaluate predictions on a benchmark (NoW)")
    eval_sub = parser.add_subparsers(dest="eval_command", metavar="BENCHMARK")
    eval_sub.required = True
    now = eval_sub.add_parser(
        "now",
        help="NoW benchmark: scan-to-mesh error of predicted meshes (median/mean/std in mm)",
        description=(
            "Evaluate predicted meshes on the NoW benchmark: crop each ground-truth scan, align the "
            "prediction by its 7 landmarks, refine on the surface, measure exact scan-to-mesh distances. "
            "Writes now_per_image.csv, now_cumulative_error.png and now_summary.json."
        ),
    )
    now.add_argument("--dataset", required=True, type=Path, metavar="NOW_DIR",
                     help="NoW download folder (with the image list, scans/ and scans_lmks_onlypp/)")
    now.add_argument("--predictions", required=True, type=Path, metavar="PRED_DIR",
                     help="predictions as PRED_DIR/<subject>/<challenge>/<image stem>.obj|.ply + .npy|.txt (7x3)")
    now.add_argument("--split", choices=["val", "test"], default="val", help="image list to use (default %(default)s)")
    now.add_argument("--challenge", choices=["all", "neutral", "expression", "occlusion", "selfie"], default="all",
                     help="evaluate one challenge only (default %(default)s)")
    now.add_argument("--metrical", action="store_true",
                     help="metrical variant: the scale is fixed by --unit instead of fitted")
    now.add_argument("--unit", choices=["mm", "cm", "m"], default="mm",
                     help="unit of the predicted meshes, used by --metrical (default %(default)s)")
    now.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                     help="parallel worker processes (default: CPU count, %(default)s)")
    now.add_argument("-o", "--out", type=Path, default=None,
                     help="output folder (default PRED_DIR/now_results)")
    now.add_argument("--no-progress", action="store_true", help="no progress bar")
    now.set_defaults(func=cmd_eval_now)


def cmd_eval_now(args: argparse.Namespace) -> int:
    """Run the NoW evaluation; 0 when every listed image was evaluated, 1 when some were left out."""
    from facefuse.eval.now import NowEvalConfig, run_now_evaluation, summary_lines

    if args.workers < 1:
        raise InvalidInputError(f"--workers must be at least 1, got {args.workers}")
    out = args.out if args.out is not None else Path(args.predictions) / "now_results"
    config = NowEvalConfig(
        dataset=Path(args.dataset),
        predictions=Path(args.predictions),
        output=Path(out),
        split=args.split,
        challenge=args.challenge,
        metrical=bool(args.metrical),
        unit=args.unit,
        workers=int(args.workers),
        progress=not getattr(args, "no_progress", False),
    )
    summary = run_now_evaluation(config)
    for line in summary_lines(summary):
        print(line)
    print(f"results in {out}: {', '.join(summary['files'].values())}")
    return 0 if summary["complete"] else 1
