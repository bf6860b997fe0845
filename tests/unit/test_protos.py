"""The generated code in src/facefuse/v1 must be what `make protos` produces from protos/ now."""

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    protos = sorted((ROOT / "protos" / "facefuse" / "v1").glob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"), f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *map(str, protos)],
        check=True,
    )
    fresh = sorted(p.name for p in (tmp_path / "facefuse" / "v1").iterdir())
    committed_dir = ROOT / "src" / "facefuse" / "v1"
    committed = sorted(p.name for p in committed_dir.iterdir() if p.name not in ("__init__.py", "__pycache__"))
    assert fresh == committed, "generated file set differs: run `make protos`"
    stale = [n for n in fresh if not filecmp.cmp(tmp_path / "facefuse" / "v1" / n, committed_dir / n, shallow=False)]
    assert not stale, f"stale generated code {stale}: run `make protos` and commit the result"


def test_every_service_is_in_the_contract() -> None:
    from facefuse.v1 import fusion_pb2, gateway_pb2, mica_pb2, ofer_pb2

    names = {
        s.full_name
        for m in (mica_pb2, ofer_pb2, fusion_pb2, gateway_pb2)
        for s in m.DESCRIPTOR.services_by_name.values()
    }
    assert names == {
        "facefuse.v1.MicaService",
        "facefuse.v1.OferService",
        "facefuse.v1.FusionService",
        "facefuse.v1.Gateway",
    }
    process = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].methods_by_name["Process"]
    assert process.client_streaming and process.server_streaming
