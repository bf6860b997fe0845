"""``--identity-group``: after a run, fuse each person's images into one shape (see fusion/identity.py)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from facefuse.client.inputs import InputItem
from facefuse.client.names import display, folder_name
from facefuse.client.outputs import ResultsLog
from facefuse.errors import InvalidInputError
from facefuse.fusion.identity import IdentityResult, fuse_identity, image_weight
from facefuse.io.atomic import write_json_atomic, write_npy_atomic, write_text_atomic
from facefuse.io.meshes import read_mesh, write_obj, write_ply
from facefuse.render import spread_colors

FOLDERS = "folders"


def group_items(items: list[InputItem], spec: str) -> dict[str, list[InputItem]]:
    """identity -> inputs: by parent folder name (``folders``) or from a CSV of ``image,identity`` rows."""
    if spec == FOLDERS:
        groups: dict[str, list[InputItem]] = {}
        for item in items:
            groups.setdefault(display(item.path.parent.name) or "root", []).append(item)
        return groups
    path = Path(spec)
    if not path.is_file():
        raise InvalidInputError(f"--identity-group {spec}: expected 'folders' or a CSV file of image,identity rows")
    by_path = {str(item.path.resolve()): item for item in items}
    by_name: dict[str, list[InputItem]] = {}
    for item in items:
        by_name.setdefault(item.path.name, []).append(item)
    groups = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        for row_number, row in enumerate(csv.reader(handle), start=1):
            if not row or row[0].startswith("#") or row[0].strip().lower() == "image":
                continue
            if len(row) < 2:
                raise InvalidInputError(f"{path}:{row_number}: expected image,identity")
            image, identity = row[0].strip(), row[1].strip()
            resolved = str((path.parent / image).resolve())
            matches = [by_path[resolved]] if resolved in by_path else by_name.get(Path(image).name, [])
            if len(matches) != 1:
                raise InvalidInputError(
                    f"{path}:{row_number}: {image!r} matches {len(matches)} of the inputs (need exactly 1)"
                )
            groups.setdefault(identity, []).append(matches[0])
    return groups


def write_identities(out: Path, groups: dict[str, list[InputItem]], method: str) -> list[dict[str, Any]]:
    """Fuse every group's OK faces (the first face of each image) and write OUT/identities/<folder>/..."""
    log = ResultsLog.open(out)
    summary = []
    for name, group in sorted(groups.items()):
        firsts = [next((e for e in log.entries(item, method) if e.get("face_index") == 0), None) for item in group]
        members = [m for m in firsts if m is not None and m.get("status") == "OK" and _inside(out, m.get("dir"))]
        target = out / "identities" / folder_name(name)
        if not members:
            summary.append({"identity": name, "status": "NO_FACES", "images": len(group)})
            continue
        result, faces = fuse_members(out, members)
        write_identity_files(target, result, faces)
        entry = {
            "identity": name,
            "status": "OK",
            "images": len(group),
            "used": len(members),
            "members": [
                {"image_id": m["image_id"], "weight": round(float(w), 4)}
                for m, w in zip(members, result.weights, strict=True)
            ],
            "dir": str(target.relative_to(out)),
            "spread_mm_mean": round(float(result.vertex_spread_mm.mean()), 4),
        }
        write_json_atomic(target / "identity.json", entry)
        summary.append(entry)
    import json

    write_text_atomic(out / "identities.jsonl", "".join(json.dumps(e, sort_keys=True) + "\n" for e in summary))
    return summary


def fuse_members(out: Path, members: list[dict[str, Any]]) -> tuple[IdentityResult, np.ndarray]:
    """Fuse the faces named by ``members`` (results.jsonl lines, OK, folders under ``out``) into one shape."""
    vertices, shapes, spreads, kpts, weights = [], [], [], [], []
    faces = np.zeros((0, 3), np.int64)
    for m in members:
        face_dir = out / m["dir"]
        v, f = read_mesh(face_dir / "mesh.ply")
        faces = f
        vertices.append(v)
        shapes.append(np.load(face_dir / "shape.npy")) if (face_dir / "shape.npy").is_file() else None
        spreads.append(
            np.load(face_dir / "uncertainty.npy") if (face_dir / "uncertainty.npy").is_file() else np.zeros(len(v))
        )
        kpts.append(np.load(face_dir / "kpt7.npy")) if (face_dir / "kpt7.npy").is_file() else None
        visibility = m.get("visibility")
        weights.append(
            image_weight(m.get("confidence"), float(np.mean(list(visibility.values()))) if visibility else None)
        )
    result = fuse_identity(
        np.stack(vertices),
        np.array(weights),
        shapes=np.stack(shapes) if len(shapes) == len(members) else None,
        spreads_mm=np.stack(spreads),
        kpt7_mm=np.stack(kpts) if len(kpts) == len(members) else None,
    )
    return result, faces


def write_identity_files(target: Path, result: IdentityResult, faces: np.ndarray) -> None:
    """The fused identity's mesh, uncertainty and (where the members had them) shape and kpt7 files."""
    write_obj(target / "mesh.obj", result.vertices_mm, faces)
    write_ply(target / "mesh.ply", result.vertices_mm, faces)
    write_ply(target / "mesh_uncertainty.ply", result.vertices_mm, faces, spread_colors(result.vertex_spread_mm))
    write_npy_atomic(target / "uncertainty.npy", result.vertex_spread_mm)
    if result.shape is not None:
        write_npy_atomic(target / "shape.npy", result.shape)
    if result.kpt7_mm is not None:
        write_npy_atomic(target / "kpt7.npy", result.kpt7_mm)


def _inside(out: Path, relative: object) -> bool:
    """A face folder named in results.jsonl that really lies under ``out`` (the log is a file anyone can edit)."""
    if not isinstance(relative, str):
        return False
    return (out / relative).resolve().is_relative_to(out.resolve())
