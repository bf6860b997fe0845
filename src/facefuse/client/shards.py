"""Split one input list over N independent clients (``--shard I/N``) and merge their results afterwards.

An input's shard is a hash of its folder key (``names.folder_name`` of its path), not its position in
the listing: every client computes the same split from the same dataset without talking to the others,
files added later do not move old ones to another shard, and each shard resumes in its own folder
``OUT/shard-I-of-N`` like any other run. ``merge_shards`` writes ``OUT/results.jsonl`` with every
shard's lines, their file paths made relative to ``OUT``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facefuse.client.inputs import InputItem
from facefuse.client.outputs import RESULTS
from facefuse.errors import InvalidInputError
from facefuse.io.atomic import write_text_atomic

MAX_SHARDS = 100_000
_FOLDER = re.compile(r"^shard-(\d+)-of-(\d+)$", re.ASCII)
_SHARD = re.compile(r"^\s*(\d{1,6})\s*/\s*(\d{1,6})\s*$", re.ASCII)


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based, as a Kubernetes Indexed Job's JOB_COMPLETION_INDEX
    count: int

    @property
    def folder(self) -> str:
        return f"shard-{self.index}-of-{self.count}"


def parse_shard(text: str) -> Shard:
    """``I/N`` with 0 <= I < N <= MAX_SHARDS."""
    match = _SHARD.match(text)
    if match is None:
        raise InvalidInputError(f"--shard {text!r}: expected I/N, e.g. 0/4 (shards are numbered from 0)")
    shard = Shard(int(match[1]), int(match[2]))
    if not 1 <= shard.count <= MAX_SHARDS or not 0 <= shard.index < shard.count:
        raise InvalidInputError(f"--shard {text!r}: expected 0 <= I < N <= {MAX_SHARDS}")
    return shard


def shard_of(key: str, count: int) -> int:
    """The shard an input key belongs to: the same on every machine and in every Python process."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big") % count


def shard_items(items: list[InputItem], shard: Shard) -> list[InputItem]:
    return [item for item in items if shard_of(item.key, shard.count) == shard.index]


def shard_folder(out: Path, shard: Shard) -> Path:
    return out / shard.folder


def merge_shards(out: Path) -> tuple[int, int]:
    """Write ``OUT/results.jsonl`` from every ``OUT/shard-I-of-N/results.jsonl``; returns (shards, lines).

    Refuses (InvalidInputError) when the folders disagree on N or a shard is missing: a merge that
    silently lacks a shard's inputs would look complete."""
    found: dict[int, Path] = {}
    counts = set()
    for folder in sorted(out.iterdir()) if out.is_dir() else ():
        match = _FOLDER.match(folder.name)
        if match and folder.is_dir():
            found[int(match[1])] = folder
            counts.add(int(match[2]))
    if not found:
        raise InvalidInputError(f"{out}: no shard-I-of-N folders to merge "
                                f"(run `facefuse reconstruct --shard I/N -o {out}` first)")
    if len(counts) != 1:
        raise InvalidInputError(f"{out}: shard folders of different splits {sorted(counts)}; keep one N per folder")
    count = counts.pop()
    missing = [i for i in range(count) if i not in found or not (found[i] / RESULTS).is_file()]
    if missing:
        shown = ", ".join(str(i) for i in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise InvalidInputError(f"{out}: {len(missing)} of {count} shard(s) have no {RESULTS} yet: {shown}")
    lines: list[str] = []
    for index in range(count):
        folder = found[index]
        for raw in (folder / RESULTS).read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue  # a torn last line of an interrupted shard: that shard's rerun rewrites it
            if isinstance(entry, dict):
                lines.append(json.dumps(_rebased(entry, folder.name, index, count), sort_keys=True))
    write_text_atomic(out / RESULTS, "".join(line + "\n" for line in lines))
    return count, len(lines)


def _rebased(entry: dict[str, Any], folder: str, index: int, count: int) -> dict[str, Any]:
    """A shard's line with its paths relative to the merged folder, and the shard it came from."""
    entry = dict(entry)
    files = entry.get("files")
    if isinstance(files, list):
        entry["files"] = [f"{folder}/{f}" for f in files if isinstance(f, str)]
    if isinstance(entry.get("dir"), str):
        entry["dir"] = f"{folder}/{entry['dir']}"
    entry["shard"] = f"{index}/{count}"
    return entry
