"""The CLI against a scripted gateway on loopback: it trusts nothing the server says.

A hostile or buggy gateway (path-traversal ids, ids never sent, impossible face indexes, malformed
tensors, NaN) cannot make the client write outside ``-o OUT``, crash it or end the run: each bad
result becomes an error line. Colliding input names get distinct folders and resume; undecodable and
over-long names get their own status; the exit codes tell failed images, a dead gateway and bad usage apart.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from gateway_double import GatewayDouble, face_result, honest

from facefuse import wire
from facefuse.client.cli import EXIT_FAILED, EXIT_GATEWAY, EXIT_OK, EXIT_USAGE, main
from facefuse.v1 import common_pb2, gateway_pb2

pytestmark = pytest.mark.timeout(120)


def _png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd two levels down, so that an escaping '../..' would still land inside tmp_path, where we look."""
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    return work


def _run(gateway: GatewayDouble, inputs: list[str], out: Path, *extra: str) -> int:
    return main(["reconstruct", *inputs, "-o", str(out), "--gateway", gateway.address, "--method", "mica",
                 "--no-progress", "--timeout", "60", *extra])


def _tensor(array: np.ndarray, **changes: object) -> common_pb2.Tensor:
    message = wire.from_numpy(array)
    for name, value in changes.items():
        if name == "shape":
            del message.shape[:]
            message.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(message, name, value)
    return message


def _attacks() -> list[tuple[str, Callable[[str], list[gateway_pb2.FaceResult]]]]:
    """(what, sent id -> the results the hostile gateway answers with)."""

    def mutate(change: Callable[[gateway_pb2.FaceResult], None]) -> Callable[[str], list[gateway_pb2.FaceResult]]:
        def build(image_id: str) -> list[gateway_pb2.FaceResult]:
            result = face_result(image_id)
            change(result)
            return [result]
        return build

    vertices = np.zeros((4, 3), np.float32)

    def renamed(new_id: str) -> Callable[[str], list[gateway_pb2.FaceResult]]:
        return lambda image_id: [face_result(new_id)]

    def set_vertices(tensor: common_pb2.Tensor) -> Callable[[gateway_pb2.FaceResult], None]:
        return lambda r: r.reconstruction.mesh.vertices.CopyFrom(tensor)

    def branch(r: gateway_pb2.FaceResult) -> None:
        r.branches.add(name="../../../escaped", reconstruction=face_result("x").reconstruction)

    def duplicate(image_id: str) -> list[gateway_pb2.FaceResult]:
        return [face_result(image_id, face_index=0, num_faces=2), face_result(image_id, face_index=0, num_faces=2)]

    return [
        ("traversal id", renamed("../../etc/x")),
        ("absolute id", renamed("/tmp/facefuse-escape")),
        ("NUL in id", renamed("0\x00/../../x")),
        ("huge face index", mutate(lambda r: setattr(r, "face_index", 2**31 - 1))),
        ("negative face index", mutate(lambda r: setattr(r, "face_index", -7))),
        ("huge num_faces", mutate(lambda r: r.MergeFrom(gateway_pb2.FaceResult(num_faces=10**9, face_index=10**6)))),
        ("wrong vertex shape", mutate(set_vertices(wire.from_numpy(np.zeros((4, 2), np.float32))))),
        ("NaN vertices", mutate(set_vertices(wire.from_numpy(np.full((4, 3), np.nan, np.float32))))),
        ("truncated tensor", mutate(set_vertices(_tensor(vertices, data=vertices.tobytes()[:-5])))),
        ("oversized tensor", mutate(set_vertices(_tensor(vertices, data=vertices.tobytes() * 3)))),
        ("overflowing shape", mutate(set_vertices(_tensor(vertices, shape=[2**32, 2**32], data=b"")))),
        ("unknown dtype", mutate(set_vertices(_tensor(vertices, dtype=99)))),
        (
            "triangle index out of range",
            mutate(
                lambda r: r.reconstruction.mesh.faces.CopyFrom(wire.from_numpy(np.array([[0, 1, 1_000_000]], np.int32)))
            ),
        ),
        (
            "NaN shape",
            mutate(lambda r: r.reconstruction.shape.CopyFrom(wire.from_numpy(np.array([np.nan] * 300, np.float32)))),
        ),
        ("infinite box", mutate(lambda r: setattr(r.face.box, "x1", float("inf")))),
        ("no reconstruction", mutate(lambda r: r.ClearField("reconstruction"))),
        ("branch named like a path", mutate(branch)),
        (
            "wrong crop size",
            mutate(lambda r: r.face.crop112.CopyFrom(wire.from_numpy(np.zeros((1024, 1024, 3), np.uint8)))),
        ),
        ("face sent twice", duplicate),
        ("unknown found_by", mutate(lambda r: setattr(r.face, "found_by", "../../etc"))),
        ("OK for no face", mutate(lambda r: setattr(r, "face_index", -1))),
        ("unknown scale source", mutate(lambda r: setattr(r.reconstruction, "scale_source", "../x"))),
        ("scale confidence above 1", mutate(lambda r: r.reconstruction.MergeFrom(
            gateway_pb2.Reconstruction(scale_source="iris", scale_confidence=1.5)))),
        ("scale confidence without a source", mutate(lambda r: setattr(r.reconstruction, "scale_confidence", 0.5))),
        ("unknown visibility of a region not reported", mutate(lambda r: r.reconstruction.visibility.MergeFrom(
            common_pb2.Visibility(regions={"lips": 1.0}, unknown=["elbow"])))),
    ]


def test_a_hostile_gateway_cannot_escape_out_or_crash_the_run(tmp_path: Path, workdir: Path) -> None:
    attacks = _attacks()
    (workdir / "in").mkdir()
    names = [f"img{i:02d}.png" for i in range(len(attacks) + 1)]  # the last one is answered honestly
    for i, name in enumerate(names):
        (workdir / "in" / name).write_bytes(_png(i))
    sent_order: list[str] = []

    def script(ids: list[str]) -> Iterator[gateway_pb2.FaceResult]:
        sent_order.extend(ids)
        for position, image_id in enumerate(ids):
            if position < len(attacks):
                yield from attacks[position][1](image_id)
            else:
                honest_result = face_result(image_id)
                honest_result.reconstruction.scale_source = "iris"
                honest_result.reconstruction.scale_confidence = 0.625
                yield honest_result

    out = workdir / "out"
    before = _files(tmp_path)
    with GatewayDouble(script) as gateway:
        code = _run(gateway, ["in"], out)
    assert code == EXIT_FAILED

    # Nothing outside OUT changed: every new path lies under it; no absolute path was touched.
    created = _files(tmp_path) - before
    assert created and all(out in p.parents or p == out for p in created), sorted(map(str, created - {out}))[:5]
    assert not Path("/tmp/facefuse-escape").exists()
    assert not list(out.rglob("*.tmp")), "no half-written files"
    assert not list(out.rglob("branch_*")), "a server string never names a folder"

    # The client sent opaque ids of its own, never a path.
    assert sent_order == [str(i) for i in range(len(names))]

    lines = _results(out)
    by_input: dict[str, list[dict]] = {}
    for line in lines:
        by_input.setdefault(Path(line["input"]).name, []).append(line)
    assert sorted(by_input) == names  # every input has its lines, no line for anything else
    for (what, _), name in zip(attacks, names, strict=False):
        statuses = {line["status"] for line in by_input[name]}
        assert statuses - {"OK"} and statuses <= {"OK", "INVALID_RESPONSE", "NO_RESULT"}, (what, by_input[name])
        assert all(not line["files"] for line in by_input[name] if line["status"] != "OK"), what
    refused = {name: " ".join(line["message"] for line in by_input[name]) for name in names}
    assert "NaN" in refused[names[7]] and "bytes" in refused[names[8]] and "shape" in refused[names[10]]
    (honest_line,) = by_input[names[-1]]
    assert honest_line["status"] == "OK" and honest_line["files"]
    # Where the metric scale came from travels to results.jsonl and params.json.
    assert honest_line["scale_source"] == "iris" and honest_line["scale_confidence"] == 0.625
    params = json.loads((out / honest_line["dir"] / "params.json").read_text(encoding="utf-8"))
    assert params["scale_source"] == "iris" and params["scale_confidence"] == 0.625
    for relative in honest_line["files"]:
        assert (out / relative).is_file()
    assert (out / honest_line["dir"]).resolve().is_relative_to(out.resolve())

    # A rerun retries exactly the images that got no usable result, and skips the good one.
    with GatewayDouble(honest()) as gateway:
        assert _run(gateway, ["in"], out) == EXIT_OK
        assert len(gateway.received[0]) == len(attacks)
    assert {line["status"] for line in _results(out)} == {"OK"}


def test_a_cli_run_against_a_hostile_gateway_prints_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(_png(0))

    def script(ids: list[str]) -> Iterator[gateway_pb2.FaceResult]:
        yield face_result("../../../x")
        bad = face_result(ids[0])
        bad.reconstruction.mesh.vertices.CopyFrom(_tensor(np.zeros((4, 3), np.float32), shape=[2**62, 2**62]))
        yield bad

    with GatewayDouble(script) as gateway:
        run = subprocess.run([sys.executable, "-m", "facefuse.client.cli", "detect", str(tmp_path / "x.png"), "-o",
                              str(tmp_path / "out"), "--gateway", gateway.address, "--no-progress"],
                             capture_output=True, text=True, timeout=100, cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == EXIT_FAILED, run.stderr
    assert "Traceback" not in run.stderr and "never sent" in run.stderr
    (line,) = _results(tmp_path / "out")
    assert line["status"] == "INVALID_RESPONSE"


def test_colliding_names_get_distinct_folders_and_a_rerun_skips_them_all(workdir: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "in" / "sub").mkdir(parents=True)
    names = ["a#1.png", "a_1.png", "sub/x.png", "sub__x.png"]
    for i, name in enumerate(names):
        (workdir / "in" / name).write_bytes(_png(i))
    out = workdir / "out"
    with GatewayDouble(honest()) as gateway:
        assert _run(gateway, ["in"], out) == EXIT_OK
        lines = _results(out)
        assert sorted(line["image_id"] for line in lines) == sorted(f"in/{n}" for n in names)
        folders = {line["dir"].split("/")[0] for line in lines}
        assert len(folders) == 4
        for line in lines:  # each folder holds its own input's face, not another's
            assert line["status"] == "OK" and all((out / f).is_file() for f in line["files"])
            assert len(line["dir"].split("/")[0]) < 100 and not line["dir"].startswith(".")
        capsys.readouterr()
        assert _run(gateway, ["in"], out) == EXIT_OK
        assert "0 image(s) processed, 4 already done" in capsys.readouterr().out
        assert len(gateway.received) == 1  # the rerun had nothing to send and opened no stream
    assert len(_results(out)) == 4


def test_an_older_runs_log_still_resumes_but_not_where_names_collided(workdir: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "in").mkdir()
    for i, name in enumerate(["ok.png", "a#1.png", "a_1.png"]):
        (workdir / "in" / name).write_bytes(_png(i))
    out = workdir / "out"
    legacy = []
    for image_id, folder in (("in/ok.png", "in__ok.png"), ("in/a#1.png", "in__a_1.png"), ("in/a_1.png", "in__a_1.png")):
        (out / folder / "face_00").mkdir(parents=True, exist_ok=True)
        (out / folder / "face_00" / "kps5.npy").write_bytes(b"x")
        legacy.append({"image_id": image_id, "face_index": 0, "num_faces": 1, "status": "OK", "method": "mica",
                       "dir": f"{folder}/face_00", "files": [f"{folder}/face_00/kps5.npy"], "input": image_id})
    (out / "results.jsonl").write_text("".join(json.dumps(e) + "\n" for e in legacy))
    with GatewayDouble(honest()) as gateway:
        assert _run(gateway, ["in"], out) == EXIT_OK
        assert "2 image(s) processed, 1 already done" in capsys.readouterr().out
    keyed = [line for line in _results(out) if "key" in line]
    assert sorted(line["image_id"] for line in keyed) == ["in/a#1.png", "in/a_1.png"]


def test_undecodable_and_over_long_names_get_their_own_status(workdir: Path) -> None:
    folder = workdir / "in"
    folder.mkdir()
    (folder / "plain.png").write_bytes(_png(0))
    undecodable = os.fsdecode(b"caf\xe9-\xff.png")
    (folder / undecodable).write_bytes(_png(1))
    too_long = "y" * 300 + ".png"
    out = workdir / "out"
    with GatewayDouble(honest()) as gateway:
        assert _run(gateway, ["in", too_long], out) == EXIT_FAILED
        assert len(gateway.received[0]) == 2  # both readable files were sent; the name alone is never sent
    raw = (out / "results.jsonl").read_bytes()
    raw.decode("utf-8")  # strict UTF-8: a reader in any language can parse the log
    lines = {line["image_id"]: line for line in _results(out)}
    assert lines["in/plain.png"]["status"] == "OK"
    assert lines["in/caf\\xe9-\\xff.png"]["status"] == "OK"
    assert all((out / f).is_file() for f in lines["in/caf\\xe9-\\xff.png"]["files"])
    (long_line,) = [line for line in lines.values() if line["image_id"].endswith(too_long)]
    assert long_line["status"] == "INVALID_ARGUMENT" and "too long" in long_line["message"]


def test_exit_codes_tell_failures_a_dead_gateway_and_bad_usage_apart(workdir: Path, tmp_path: Path) -> None:
    (workdir / "in").mkdir()
    for i in range(3):
        (workdir / "in" / f"{i}.png").write_bytes(_png(i))
    (workdir / "in" / "broken.png").write_bytes(b"not an image at all")
    out = workdir / "out"

    def one_failure(ids: list[str]) -> Iterator[gateway_pb2.FaceResult]:
        yield from honest()(ids[:-1])
        yield gateway_pb2.FaceResult(
            image_id=ids[-1], face_index=-1, status=common_pb2.Status(code=3, message="truncated")
        )

    with GatewayDouble(one_failure) as gateway:
        assert _run(gateway, ["in"], out) == EXIT_FAILED
    # The gateway reads one image, answers it and ends the stream "OK": the others are not silently lost.
    with GatewayDouble(honest(), read_only=1) as gateway:
        assert _run(gateway, ["in"], workdir / "out1") == EXIT_FAILED
    assert sorted(line["status"] for line in _results(workdir / "out1")) == ["NO_RESULT"] * 3 + ["OK"]
    # The gateway refuses our options for the whole stream: bad usage, like an unknown path.
    with GatewayDouble(honest(), abort=(grpc.StatusCode.INVALID_ARGUMENT, "unknown strategy 'x'", 0)) as gateway:
        assert _run(gateway, ["in"], workdir / "out2") == EXIT_USAGE
    assert main(["detect", "nowhere.png", "-o", str(workdir / "out3"), "--gateway", "127.0.0.1:1"]) == EXIT_USAGE
    # The gateway dies after two results: finished outputs stay, the rest is left for a rerun.
    with GatewayDouble(honest(), abort=(grpc.StatusCode.UNAVAILABLE, "going away", 2)) as gateway:
        assert _run(gateway, ["in"], workdir / "out4") == EXIT_GATEWAY
    assert [line["status"] for line in _results(workdir / "out4")] == ["OK", "OK"]
    with GatewayDouble(honest()) as gateway:
        assert _run(gateway, ["in"], workdir / "out4") == EXIT_OK
        assert len(gateway.received[0]) == 2
    # Nothing listens: the gateway is down.
    with GatewayDouble(honest()) as gateway:
        port = gateway.port
    assert (
        main(["detect", "in", "-o", str(workdir / "out5"), "--gateway", f"127.0.0.1:{port}", "--no-progress"])
        == EXIT_GATEWAY
    )


def test_the_exit_codes_are_in_the_help() -> None:
    run = subprocess.run([sys.executable, "-m", "facefuse.client.cli", "reconstruct", "--help"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 0
    for code in (EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_GATEWAY):
        assert f"\n  {code} " in run.stdout
    assert "gateway is down" in run.stdout and "bad usage" in run.stdout


def test_a_face_whose_files_cannot_be_written_is_a_status_not_an_abort(workdir: Path) -> None:
    from facefuse.client.names import folder_name

    (workdir / "in").mkdir()
    for name in ("blocked.png", "fine.png"):
        (workdir / "in" / name).write_bytes(_png(0))
    out = workdir / "out"
    out.mkdir()
    (out / folder_name("in/blocked.png")).write_bytes(b"a file where the face folder should go")
    with GatewayDouble(honest()) as gateway:
        assert _run(gateway, ["in"], out) == EXIT_FAILED
    lines = {line["image_id"]: line for line in _results(out)}
    assert (
        lines["in/blocked.png"]["status"] == "WRITE_FAILED" and "could not write" in lines["in/blocked.png"]["message"]
    )
    assert lines["in/fine.png"]["status"] == "OK"
