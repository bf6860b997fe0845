"""``facefuse detect|reconstruct --shard I/N``: shards together cover the inputs once, each resumes in its
own folder, and ``facefuse shards merge`` joins their results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from facefuse.servers.local import LocalMesh

pytestmark = pytest.mark.slow


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "facefuse.client.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_shards_cover_the_inputs_once_resume_and_merge(open_mesh: LocalMesh, astronaut_jpeg: bytes,
                                                       tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(5):
        (photos / f"p{i}.jpg").write_bytes(astronaut_jpeg)
    out = tmp_path / "out"
    runs = []
    for index in range(2):
        run = _cli("detect", str(photos), "-o", str(out), "--shard", f"{index}/2", "--gateway",
                   open_mesh.gateway_address, "--no-progress")
        assert run.returncode == 0, run.stderr[-2000:]
        runs.append(run.stdout)
    again = _cli("detect", str(photos), "-o", str(out), "--shard", "1/2", "--gateway", open_mesh.gateway_address,
                 "--no-progress")
    assert again.returncode == 0 and "0 image(s) processed" in again.stdout, again.stdout  # resumed: all done
    merged = _cli("shards", "merge", str(out))
    assert merged.returncode == 0, merged.stderr
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    inputs = sorted(Path(line["input"]).name for line in lines)
    assert inputs == [f"p{i}.jpg" for i in range(5)]  # every photo once, from one shard or the other
    assert all((out / f).is_file() for line in lines for f in line["files"])
    assert {line["shard"] for line in lines} <= {"0/2", "1/2"}


def test_a_bad_shard_is_a_usage_error(tmp_path: Path) -> None:
    run = _cli("detect", str(tmp_path), "-o", str(tmp_path / "o"), "--shard", "2/2")
    assert run.returncode == 2 and "--shard" in run.stderr and "Traceback" not in run.stderr
    merge = _cli("shards", "merge", str(tmp_path))
    assert merge.returncode == 2 and "no shard-I-of-N folders" in merge.stderr
