"""``facefuse eval now`` end to end on a synthetic NoW-layout dataset, through the argparse handler."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facefuse.client.commands import eval as eval_commands
from facefuse.errors import FacefuseError

from eval_fixtures import make_now_dataset


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facefuse")
    eval_commands.register(parser.add_subparsers(dest="command"))
    return parser


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    return make_now_dataset(tmp_path_factory.mktemp("now_cli"), n_subjects=3, images_per_challenge=1, missing=1)


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_eval_now_writes_csv_png_json(tmp_path: Path, dataset, workers: str, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results"
    rc = _run(["eval", "now", "--dataset", str(dataset.root), "--predictions", str(dataset.predictions),
               "--workers", workers, "-o", str(out), "--no-progress"])
    assert rc == 1  # one prediction is missing: reported, left out, signalled by the exit code
    printed = capsys.readouterr().out
    assert "1 missing" in printed and "median" in printed
    with (out / "now_per_image.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [f"{r['subject']}/{r['challenge']}/{r['image']}" for r in rows] == sorted(dataset.images)
    assert (out / "now_cumulative_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "now_summary.json").read_text())
    assert summary["n_images_listed"] == len(dataset.images)
    assert summary["n_missing"] == 1 and summary["complete"] is False
    assert "LEFT OUT" in summary["note"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert summary["overall"]["n_points"] == sum(int(r["n_points"]) for r in ok)
    # The predictions are exact copies of the scanned surfaces: the protocol must find ~0 error.
    assert summary["overall"]["median_mm"] < 1e-4
    assert max(float(r["mean_mm"]) for r in ok) < 1e-4


def test_eval_now_metrical_challenge_and_complete_run(tmp_path: Path) -> None:
    fx = make_now_dataset(tmp_path, n_subjects=1, missing=0, pred_unit="m", layout="flat")
    out = tmp_path / "r"
    argv = ["eval", "now", "--dataset", str(fx.root), "--predictions", str(fx.predictions), "--workers", "1",
            "--no-progress", "-o", str(out), "--metrical", "--unit", "m", "--challenge", "occlusion"]
    assert _run(argv) == 0
    summary = json.loads((out / "now_summary.json").read_text())
    assert summary["variant"] == "metrical" and summary["unit"] == "m"
    assert list(summary["per_challenge"]) == ["occlusion"]
    assert summary["overall"]["median_mm"] < 1e-3
    # The same metre-sized predictions read as millimetres are 1000x too small: a huge metrical error.
    argv[argv.index("--unit") + 1] = "mm"
    assert _run(argv) == 0
    assert json.loads((out / "now_summary.json").read_text())["overall"]["median_mm"] > 10.0


def test_eval_now_user_errors_are_facefuse_errors(tmp_path: Path, dataset) -> None:
    with pytest.raises(FacefuseError, match="does not exist"):
        _run(["eval", "now", "--dataset", str(tmp_path / "missing"), "--predictions", str(dataset.predictions)])
    with pytest.raises(FacefuseError, match=r"imagepathstest\.txt"):
        _run(
            [
                "eval",
                "now",
                "--dataset",
                str(dataset.root),
                "--predictions",
                str(dataset.predictions),
                "--split",
                "test",
            ]
        )
    with pytest.raises(FacefuseError, match="workers"):
        _run(
            ["eval", "now", "--dataset", str(dataset.root), "--predictions", str(dataset.predictions), "--workers", "0"]
        )
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval", "now", "--dataset", "x", "--predictions", "y", "--challenge", "pose"])


def test_cli_main_routes_eval_now_when_available(tmp_path: Path, dataset) -> None:
    """Through the lead's ``facefuse`` entry point, where it registers this command."""
    cli = pytest.importorskip("facefuse.client.cli")
    rc = cli.main(["eval", "now", "--dataset", str(dataset.root), "--predictions", str(dataset.predictions),
                   "--workers", "1", "--no-progress", "-o", str(tmp_path / "o")])
    assert rc == 1
    assert np.isfinite(json.loads((tmp_path / "o" / "now_summary.json").read_text())["overall"]["mean_mm"])
