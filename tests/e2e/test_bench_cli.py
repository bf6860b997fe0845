"""``facefuse bench now`` and ``bench occlusion`` end to end on the open pack (no assets).

A synthetic NoW layout (tests/eval_fixtures.py) whose pictures are the astronaut photo, so the open
front end finds a real face; the ground-truth "scans" are the fixture's synthetic heads, so NoW
errors are finite numbers, not meaningful ones. Gateway images and fusion calls are counted at the
gRPC stubs, independently of the bench's own counters.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from facefuse.errors import InvalidInputError
from facefuse.servers.local import LocalMesh
from facefuse.v1 import fusion_pb2_grpc, gateway_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval_fixtures import make_now_dataset

SAMPLES = 3
SEED = 1
FACE_BOX = {"left": 165, "top": 60, "right": 290, "bottom": 185}  # around the astronaut's face, not the detector's box
OPEN_KPT7 = (33, 133, 362, 263, 2, 61, 291)  # docs: NoW's 7 points on the 468 FaceMesh topology


def _astronaut_jpeg() -> bytes:
    import skimage.data
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(workdir=tmp_path_factory.mktemp("bench-mesh"), env={"FACEFUSE_ASSETS": ""}) as running:
        yield running


@pytest.fixture(scope="module")
def now_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One subject, two listed images (neutral, expression), both the astronaut with a NoW-style box."""
    tmp = tmp_path_factory.mktemp("now")
    fixture = make_now_dataset(tmp, n_subjects=1, images_per_challenge=1, missing=0)
    base = fixture.root / "NoW_Dataset" / "final_release_version"
    entries = fixture.images[:2]
    photo = _astronaut_jpeg()
    for entry in entries:
        subject, challenge, name = entry.split("/")
        (base / "iphone_pictures" / subject / challenge / name).write_bytes(photo)
        np.save(
            base / "detected_face" / subject / challenge / name.replace(".jpg", ".npy"), FACE_BOX, allow_pickle=True
        )
    (base / "imagepathsvalidation.txt").write_text("\n".join(entries) + "\n")
    return fixture.root, entries


class StubCounter:
    """Counts images sent to Gateway.Process and Fuse calls made by this process's stubs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images = 0
        self.fuse_calls = 0
        counter = self
        gateway_init = gateway_pb2_grpc.GatewayStub.__init__
        fusion_init = fusion_pb2_grpc.FusionServiceStub.__init__

        def counting_gateway(stub, channel):  # type: ignore[no-untyped-def]
            gateway_init(stub, channel)
            process = stub.Process

            def counted(requests, **kwargs):  # type: ignore[no-untyped-def]
                def chunks():  # type: ignore[no-untyped-def]
                    for chunk in requests:
                        counter.images += int(chunk.last)
                        yield chunk

                return process(chunks(), **kwargs)

            stub.Process = counted

        def counting_fusion(stub, channel):  # type: ignore[no-untyped-def]
            fusion_init(stub, channel)
            fuse = stub.Fuse

            def counted(request, **kwargs):  # type: ignore[no-untyped-def]
                counter.fuse_calls += 1
                return fuse(request, **kwargs)

            stub.Fuse = counted

        monkeypatch.setattr(gateway_pb2_grpc.GatewayStub, "__init__", counting_gateway)
        monkeypatch.setattr(fusion_pb2_grpc.FusionServiceStub, "__init__", counting_fusion)

    def reset(self) -> None:
        self.images = self.fuse_calls = 0


def run_bench(*argv: str) -> int:
    from facefuse.client.commands import bench

    parser = argparse.ArgumentParser(prog="facefuse")
    bench.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return int(args.func(args))


def mesh_args(mesh: LocalMesh) -> list[str]:
    return ["--gateway", mesh.gateway_address, "--fusion", mesh.address("fusion"), "--no-progress", "--workers", "1",
            "--samples", str(SAMPLES), "--seed", str(SEED)]


def obj_vertices(path: Path) -> np.ndarray:
    rows = [line.split()[1:4] for line in path.read_text().splitlines() if line.startswith("v ")]
    return np.array(rows, dtype=np.float64)


def gateway_result(mesh: LocalMesh, data: bytes, **options: object):  # type: ignore[no-untyped-def]
    from facefuse.client.api import GatewayClient, ImageInput

    box = (FACE_BOX["left"], FACE_BOX["top"], FACE_BOX["right"], FACE_BOX["bottom"])
    with GatewayClient(mesh.gateway_address, timeout_s=120) as client:
        (result,) = list(
            client.process([ImageInput("x", data)], boxes=[box], num_samples=SAMPLES, seed=SEED, **options)
        )
    assert result.status.code == 0, result.status.message
    return result


def test_bench_now_table_cache_and_refusion(
    mesh: LocalMesh,
    now_dataset: tuple[Path, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from facefuse import wire

    root, entries = now_dataset
    out = tmp_path / "bench"
    counter = StubCounter(monkeypatch)
    common = ["now", "--dataset", str(root), "-o", str(out), "--per-challenge", *mesh_args(mesh)]
    assert run_bench(*common, "--methods", "mica,ofer,fuse", "--strategies", "linear,region,pool") == 0
    printed = capsys.readouterr().out
    names = ["mica", "ofer", "fuse-linear", "fuse-region", "fuse-pool"]
    # one branch pass per image, then pool (steers the ranker) through the gateway again; ofer/linear/region re-fused
    assert counter.images == 2 * len(entries) and counter.fuse_calls == 3 * len(entries)
    assert "ran through the gateway again" in printed and all(name in printed for name in names)

    summary = json.loads((out / "bench_now.json").read_text())
    with open(out / "bench_now.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["name"] for row in table] == names == [row[0] for row in summary["rows"]]
    assert summary["topology"] == ["mediapipe468"]
    for row in table:
        assert row["images"] == f"{len(entries)}/{len(entries)}"
        for column in ("median_mm", "mean_mm", "std_mm", "neutral_median_mm", "expression_mean_mm"):
            assert np.isfinite(float(row[column])) and float(row[column]) > 0
        assert row["occlusion_median_mm"] == ""  # no occlusion image listed

    # the submission layout: 468-vertex meshes in mm, kpt7 = FaceMesh points in NoW order
    subject, challenge, name = entries[0].split("/")
    stem = name.removesuffix(".jpg")
    for entry_name in names:
        folder = out / "predictions" / entry_name / subject / challenge
        vertices = obj_vertices(folder / f"{stem}.obj")
        kpt7 = np.load(folder / f"{stem}.npy")
        assert vertices.shape == (468, 3) and kpt7.shape == (7, 3)
        np.testing.assert_allclose(kpt7, vertices[list(OPEN_KPT7)], atol=1e-4)
        eye_outer = np.linalg.norm(kpt7[0] - kpt7[3])
        assert 60 < eye_outer < 130  # a human face in millimetres

    # re-fusing cached branches gives what the gateway gives for that strategy (and mica is MICA's own answer)
    photo = (
        root / "NoW_Dataset" / "final_release_version" / "iphone_pictures" / subject / challenge / name
    ).read_bytes()
    for entry_name, options in (("fuse-linear", {"method": "fuse", "strategy": "linear"}), ("mica", {"method": "mica"}),
                                ("ofer", {"method": "ofer"})):
        expected = wire.to_numpy(gateway_result(mesh, photo, **options).reconstruction.mesh.vertices)
        got = obj_vertices(out / "predictions" / entry_name / subject / challenge / f"{stem}.obj")
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=entry_name)

    # rerun: everything from the cache, no gateway image, no fusion call, the same table
    counter.reset()
    assert run_bench(*common, "--methods", "mica,ofer,fuse", "--strategies", "linear,region,pool") == 0
    assert counter.images == 0 and counter.fuse_calls == 0
    assert json.loads((out / "bench_now.json").read_text())["rows"] == summary["rows"]
    # a new non-steering strategy costs fusion calls only
    counter.reset()
    assert run_bench(*common, "--methods", "fuse", "--strategies", "linear,gaussian") == 0
    assert counter.images == 0 and counter.fuse_calls == len(entries)
    # other sampling settings in the same folder are refused, not mixed in
    with pytest.raises(InvalidInputError, match="other settings"):
        run_bench("now", "--dataset", str(root), "-o", str(out), *mesh_args(mesh)[:-4], "--samples", "5", "--seed", "1")


def test_bench_now_local_flag_starts_and_stops_a_mesh(now_dataset: tuple[Path, list[str]], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = now_dataset
    monkeypatch.setenv("FACEFUSE_ASSETS", "")
    assert run_bench("now", "--dataset", str(root), "--local", "--methods", "mica", "--limit", "1", "--workers", "1",
                     "--no-progress", "-o", str(tmp_path / "b")) == 0
    summary = json.loads((tmp_path / "b" / "bench_now.json").read_text())
    assert [row[0] for row in summary["rows"]] == ["mica"] and summary["rows"][0][2] == "1/1"


def _start_fusion(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    import subprocess
    import time

    port_file = tmp_path / "fusion.port"
    proc = subprocess.Popen([sys.executable, "-m", "facefuse.servers.fusion", "--pack", "open", "--port", "0",
                             "--port-file", str(port_file), "--grace", "1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "FACEFUSE_ASSETS": ""})
    deadline = time.monotonic() + 60
    while not (port_file.is_file() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"fusion service did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text()}"


def test_bench_now_tune_writes_a_profile_the_fusion_service_uses(
        mesh: LocalMesh, now_dataset: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import grpc

    from facefuse import wire
    from facefuse.client.bench.predictions import Branches
    from facefuse.fusion.profile import read_profile
    from facefuse.v1 import common_pb2, fusion_pb2

    root, entries = now_dataset
    out = tmp_path / "tune"
    counter = StubCounter(monkeypatch)
    assert run_bench("now", "--dataset", str(root), "-o", str(out), "--tune", *mesh_args(mesh)) == 0
    printed = capsys.readouterr().out
    assert "the test split is never used for tuning" in printed
    for name in ("mica alone", "ofer alone", "(seed's linear blend)", "ofer ranked", "ofer random pick",
                 "ofer oracle pick", "<- chosen", "ranking closes"):
        assert name in printed, name
    assert counter.images == len(entries)  # MICA and OFER ran once per image: one branch pass
    summary = json.loads((out / "bench_now_tune.json").read_text())
    profile = read_profile(out / "fusion_profile.json")
    assert profile.strategy == summary["chosen"]["strategy"] and profile.options == summary["chosen"]["options"]
    assert profile.validation["split"] == "val" and profile.validation["images"] == len(entries)
    assert profile.facefuse_version and {"mica alone", "ofer alone"} <= set(profile.validation["baselines"])
    chosen_row = next(row for row in summary["rows"] if row[0].endswith("<- chosen"))
    assert chosen_row[6] == summary["chosen"]["median_mm"] == min(
        row[6] for row in summary["rows"] if row[1] == "candidate" and row[5] == 0)
    oracle, ranked, random_pick = (summary["selection"][k]["median_mm"] for k in ("oracle", "ranked", "random"))
    assert oracle <= ranked + 1e-9 and oracle <= random_pick + 1e-9
    # rerun: branches from the cache, no gateway image
    counter.reset()
    assert run_bench("now", "--dataset", str(root), "-o", str(out), "--tune", *mesh_args(mesh)) == 0
    assert counter.images == 0
    # never on the test split
    with pytest.raises(InvalidInputError, match="validation split only"):
        run_bench("now", "--dataset", str(root), "-o", str(tmp_path / "t2"), "--tune", "--split", "test",
                  *mesh_args(mesh))

    # the fusion service started with the profile: default strategy and options from it, shown in Info
    proc, address = _start_fusion(tmp_path, "--fusion-profile", str(out / "fusion_profile.json"))
    try:
        with grpc.insecure_channel(address) as tuned_channel, grpc.insecure_channel(mesh.address("fusion")) as plain:
            tuned_stub, plain_stub = (fusion_pb2_grpc.FusionServiceStub(c) for c in (tuned_channel, plain))
            info = tuned_stub.Info(common_pb2.InfoRequest(), timeout=30)
            assert info.details["profile_strategy"] == profile.strategy
            assert json.loads(info.details["profile_options"]) == profile.options
            assert info.details["fusion_profile"] == str(out / "fusion_profile.json")
            listing = tuned_stub.ListStrategies(fusion_pb2.ListStrategiesRequest(), timeout=30)
            assert listing.default_strategy == profile.strategy
            data = np.load(next((out / "cache" / "branches").rglob("*.npz")))
            branches = Branches.from_arrays(data)
            request = fusion_pb2.FuseRequest(samples=wire.from_numpy(branches.samples),
                                             scores=wire.from_numpy(branches.scores),
                                             mica_shape=wire.from_numpy(branches.mica.shape))
            visibility = branches.visibility_message()
            if visibility is not None:
                request.visibility.CopyFrom(visibility)
            tuned = tuned_stub.Fuse(request, timeout=30)  # no strategy named: the profile's
            explicit = fusion_pb2.FuseRequest()
            explicit.CopyFrom(request)
            explicit.strategy = profile.strategy
            explicit.options.update(profile.options)
            reference = plain_stub.Fuse(explicit, timeout=30)
            assert tuned.strategy == profile.strategy
            np.testing.assert_array_equal(wire.to_numpy(tuned.shape), wire.to_numpy(reference.shape))
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_fusion_service_refuses_a_bad_profile(tmp_path: Path) -> None:
    import subprocess

    bad = tmp_path / "profile.json"
    bad.write_text(json.dumps({"format": "facefuse-fusion-profile", "version": 1, "strategy": "linear",
                               "options": {"w": 0.5, "bogus": 1.0}}))
    out = subprocess.run([sys.executable, "-m", "facefuse.servers.fusion", "--pack", "open", "--port", "0",
                          "--fusion-profile", str(bad)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FACEFUSE_ASSETS": ""})
    assert out.returncode == 2 and "bogus" in out.stderr and "Traceback" not in out.stderr


def test_bench_occlusion_distances(mesh: LocalMesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from facefuse import wire

    photos = tmp_path / "photos"
    photos.mkdir()
    photo = _astronaut_jpeg()
    (photos / "astronaut.jpg").write_bytes(photo)
    out = tmp_path / "occ"
    assert run_bench("occlusion", "--images", str(photos), "--methods", "mica,fuse", "--strategies", "linear",
                     "--kinds", "mask,rect", "--coverage", "0.1,0.2", "-o", str(out), *mesh_args(mesh)) == 0
    assert "mean_mm" in capsys.readouterr().out
    summary = json.loads((out / "bench_occlusion.json").read_text())
    with open(out / "bench_occlusion.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["name"], r["variant"]) for r in table] == [
        (name, variant)
        for name in ("mica", "fuse-linear")
        for variant in ("control", "mask", "rectangle-0.10", "rectangle-0.20")
    ]
    region_columns = [c for c in table[0] if c.endswith("_mm") and c not in ("mean_mm", "rigid_mm")]
    assert {"face_mm", "nose_mm", "lips_mm", "eye_region_mm"} <= set(region_columns)
    for row in table:
        assert row["images"] == "1/1", row
        values = [float(row[c]) for c in ("mean_mm", "rigid_mm", *region_columns)]
        assert all(np.isfinite(v) and v >= 0 for v in values)
        if row["variant"] == "control":  # the same pixels again: the mesh is deterministic
            assert max(values) == 0.0 and float(row["size_ratio"]) == pytest.approx(1.0)
        else:
            assert float(row["mean_mm"]) > 0
        if row["variant"].startswith("rectangle"):
            assert abs(float(row["measured_coverage"]) - float(row["coverage"])) < 0.02

    # the mica distance recomputed here from the written variant photo and the original, through the gateway
    variant_png = next((out / "variants").rglob("mask.png")).read_bytes()
    clean = wire.to_numpy(gateway_result(mesh, photo, method="mica").reconstruction.mesh.vertices)
    masked = wire.to_numpy(gateway_result(mesh, variant_png, method="mica").reconstruction.mesh.vertices)
    expected = float(np.linalg.norm(masked.astype(np.float64) - clean, axis=1).mean())
    (mica_mask,) = [r for r in summary["per_image"] if r["name"] == "mica" and r["variant"] == "mask"]
    assert mica_mask["mean_mm"] == pytest.approx(expected, rel=1e-5)


def test_bench_occlusion_now_error_per_level(
    mesh: LocalMesh, now_dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, _ = now_dataset
    pictures = root / "NoW_Dataset" / "final_release_version" / "iphone_pictures"
    out = tmp_path / "occ-now"
    assert run_bench("occlusion", "--images", str(pictures), "--now-dataset", str(root), "--methods", "mica",
                     "--kinds", "rect", "--coverage", "0.1", "-o", str(out), *mesh_args(mesh)) == 0
    summary = json.loads((out / "bench_occlusion.json").read_text())
    now = summary["now"]
    assert [row[:3] for row in now["rows"]] == [["mica", "clean", "2/2"], ["mica", "rectangle-0.10", "2/2"]]
    assert all(np.isfinite(v) and v > 0 for row in now["rows"] for v in row[3:])
    # the clean level is the NoW error of the same meshes as `bench now` evaluates (same photos, same boxes)
    from facefuse.eval.now import NowEvalConfig, run_now_evaluation

    folder = out / "now" / "predictions" / "clean" / "mica"
    reference = run_now_evaluation(
        NowEvalConfig(dataset=root, predictions=folder, output=tmp_path / "ev", progress=False)
    )
    assert now["rows"][0][3] == pytest.approx(reference["overall"]["median_mm"])


def test_entries_and_boxes_are_checked(tmp_path: Path) -> None:
    from facefuse.client.bench.entries import BenchEntry, bench_entries
    from facefuse.client.bench.now import read_now_box
    from facefuse.client.bench.occlusion import occluder_kinds, variant_specs
    from facefuse.errors import AssetError

    known = ["mica", "ofer", "linear", "pool"]
    assert bench_entries(["mica", "fuse"], [], known, "linear") == [BenchEntry("mica"), BenchEntry("fuse", "linear")]
    assert [e.steered for e in bench_entries(["fuse"], ["linear", "pool"], known, "linear")] == [False, True]
    for methods, strategies in ((["mica", "nope"], []), (["fuse"], ["nope"]), (["mica"], ["linear"]), ([], [])):
        with pytest.raises(InvalidInputError):
            bench_entries(methods, strategies, known, "linear")
    assert occluder_kinds(["band", "rect", "mask"]) == ["eye_band", "rectangle", "mask"]
    with pytest.raises(InvalidInputError):
        occluder_kinds(["scarf"])
    labels = [s.label for s in variant_specs(["mask", "hand"], [0.1, 0.3], seed=2)]
    assert labels == ["control", "mask", "hand-0.10", "hand-0.30"]
    # a variant's seed does not depend on which other variants are asked for
    alone = {s.label: s.seed for s in variant_specs(["hand"], [0.3], seed=2)}
    assert (
        alone["hand-0.30"]
        == {s.label: s.seed for s in variant_specs(["mask", "hand"], [0.1, 0.3], seed=2)}["hand-0.30"]
    )

    np.save(tmp_path / "dict.npy", {"left": 1, "top": 2, "right": 30.5, "bottom": 40}, allow_pickle=True)
    np.save(tmp_path / "plain.npy", np.array([1.0, 2.0, 30.5, 40.0]))
    np.save(tmp_path / "flipped.npy", np.array([30.0, 2.0, 1.0, 40.0]))
    assert read_now_box(tmp_path / "dict.npy") == read_now_box(tmp_path / "plain.npy") == (1.0, 2.0, 30.5, 40.0)
    with pytest.raises(AssetError, match=r"flipped\.npy"):
        read_now_box(tmp_path / "flipped.npy")
