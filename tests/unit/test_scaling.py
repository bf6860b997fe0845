"""Scaling pieces without servers: the backend service config, replica addresses, --replicas, --shard and
the merge of shards' results."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from facefuse.client.inputs import InputItem
from facefuse.client.outputs import RESULTS
from facefuse.client.shards import Shard, merge_shards, parse_shard, shard_items
from facefuse.errors import InvalidInputError
from facefuse.rpc.options import RETRIED_METHODS, backend_channel_options, backend_service_config, backend_target
from facefuse.servers.local import parse_replicas, replica_names
from facefuse.v1 import fusion_pb2, mica_pb2, ofer_pb2


def test_the_service_config_balances_and_retries_only_idempotent_calls() -> None:
    config = backend_service_config()
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method_config,) = config["methodConfig"]
    assert "hedgingPolicy" not in method_config
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method_config["retryPolicy"]["maxAttempts"] >= 2
    named = {(n["service"], n["method"]) for n in method_config["name"]}
    assert ("facefuse.v1.MicaService", "Predict") in named and ("facefuse.v1.FusionService", "Fuse") in named
    assert {("facefuse.v1.OferService", "Sample"), ("facefuse.v1.OferService", "Rank")} <= named
    assert not any(n["service"] == "facefuse.v1.Gateway" for n in method_config["name"])  # a stream of uploads


def test_the_retried_names_are_real_methods() -> None:
    services = {"facefuse.v1.MicaService": mica_pb2, "facefuse.v1.OferService": ofer_pb2,
                "facefuse.v1.FusionService": fusion_pb2}
    for service, methods in RETRIED_METHODS.items():
        descriptor = services[service].DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]]
        for method in methods:
            assert method in descriptor.methods_by_name, f"{service}/{method} does not exist"


def test_a_channel_accepts_the_options() -> None:
    options = dict(backend_channel_options(8, tls_name="ofer"))
    assert options["grpc.per_rpc_retry_buffer_size"] == 8 << 20  # a Face with crops fits, so it can be retried
    assert options["grpc.ssl_target_name_override"] == "ofer"
    with grpc.insecure_channel(backend_target("127.0.0.1:1,127.0.0.1:2"), options=list(options.items())):
        pass  # gRPC parses the service config when the channel is made; a bad one raises here


@pytest.mark.parametrize("address,target", [
    ("ofer:50052", "ofer:50052"),
    ("dns:///ofer.facefuse.svc:50052", "dns:///ofer.facefuse.svc:50052"),
    ("127.0.0.1:5001, 127.0.0.1:5002", "ipv4:127.0.0.1:5001,127.0.0.1:5002"),
    ("[::1]:5001,[::1]:5002", "ipv6:[::1]:5001,[::1]:5002"),
])
def test_backend_targets(address: str, target: str) -> None:
    assert backend_target(address) == target


@pytest.mark.parametrize("address", ["ofer:1,mica:2", "127.0.0.1:1,", "127.0.0.1:1,[::1]:2",
                                     "127.0.0.1:1,127.0.0.1:99999", "127.0.0.1:1,127.0.0.1:²"])
def test_bad_address_lists_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="address list"):
        backend_target(address)


def test_replicas_flag() -> None:
    assert parse_replicas("ofer=2, mica=3") == {"ofer": 2, "mica": 3}
    assert parse_replicas("") == {}
    assert replica_names("ofer", 3) == ["ofer", "ofer-2", "ofer-3"]
    for bad in ("gateway=2", "ofer", "ofer=0", "ofer=x", "ofer=99", "ofer=²"):
        with pytest.raises(InvalidInputError, match="--replicas"):
            parse_replicas(bad)


def test_shard_flag() -> None:
    assert parse_shard("0/4") == Shard(0, 4) and parse_shard("3/4").folder == "shard-3-of-4"
    assert parse_shard(" 1 / 2 ") == Shard(1, 2)
    for bad in ("4/4", "-1/4", "1", "a/b", "0/0", "1/2/3", "²/4", "1/٤", "0/9999999", ""):
        with pytest.raises(InvalidInputError, match="--shard"):
            parse_shard(bad)


def test_shards_split_every_input_exactly_once_and_stably() -> None:
    items = [InputItem(f"photos/{i:05d}.jpg", Path(f"photos/{i:05d}.jpg")) for i in range(2000)]
    shards = [shard_items(items, Shard(i, 4)) for i in range(4)]
    keys = [item.key for shard in shards for item in shard]
    assert sorted(keys) == sorted(item.key for item in items)  # a partition: nothing lost, nothing twice
    assert all(400 < len(shard) < 600 for shard in shards), [len(s) for s in shards]  # roughly even
    # Another listing order, or more files, moves no old input to another shard.
    more = [*reversed(items), *(InputItem(f"new/{i}.jpg", Path(f"new/{i}.jpg")) for i in range(50))]
    again = {item.key for item in shard_items(more, Shard(2, 4))}
    assert {item.key for item in shards[2]} <= again


def _shard_results(out: Path, index: int, count: int, lines: list[dict]) -> None:
    folder = out / f"shard-{index}-of-{count}"
    folder.mkdir(parents=True)
    (folder / RESULTS).write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"torn')


def test_merge_rebases_paths_and_refuses_a_missing_shard(tmp_path: Path) -> None:
    face = {"key": "a-1", "face_index": 0, "status": "OK", "files": ["a-1/face_00/mesh.obj"], "dir": "a-1/face_00"}
    _shard_results(tmp_path, 0, 2, [face])
    with pytest.raises(InvalidInputError, match="1 of 2 shard"):
        merge_shards(tmp_path)
    _shard_results(tmp_path, 1, 2, [{"key": "b-2", "face_index": -1, "status": "NOT_FOUND", "files": []}])
    assert merge_shards(tmp_path) == (2, 2)
    merged = [json.loads(line) for line in (tmp_path / RESULTS).read_text().splitlines()]
    assert merged[0]["files"] == ["shard-0-of-2/a-1/face_00/mesh.obj"]
    assert merged[0]["dir"] == "shard-0-of-2/a-1/face_00"
    assert [m["shard"] for m in merged] == ["0/2", "1/2"]
    _shard_results(tmp_path, 0, 3, [])
    with pytest.raises(InvalidInputError, match="different splits"):
        merge_shards(tmp_path)


def test_max_connection_age_makes_clients_reconnect() -> None:
    """A server with --max-connection-age-s closes old connections (GOAWAY), so a client's channel goes
    back to IDLE and its next call re-resolves the name: how the gateway finds replicas added later."""
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from facefuse.servers.base import ServerOptions, start_server

    SERVING = health_pb2.HealthCheckResponse.SERVING
    running = start_server(lambda server: None, [], ServerOptions(max_connection_age_s=0.5))
    states: list[grpc.ChannelConnectivity] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            channel.subscribe(states.append)
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
            deadline = time.monotonic() + 10
            ready, idle = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE
            while not (ready in states and idle in states[states.index(ready):]):  # callbacks arrive late
                assert time.monotonic() < deadline, f"the connection was never closed: {states}"
                time.sleep(0.05)
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
            channel.unsubscribe(states.append)
    finally:
        running.stop(0)


def test_a_token_file_must_hold_one_printable_ascii_token(tmp_path: Path) -> None:
    """The token is compared in constant time, which needs ASCII: anything else is refused at start-up."""
    from facefuse.rpc.security import read_token

    good = tmp_path / "good"
    good.write_bytes(b"  s3cret-token\n")
    assert read_token(good) == "s3cret-token"
    for name, data in {"empty": b"\n", "space": b"two words", "latin1": b"caf\xe9", "utf8": "tök".encode(),
                       "control": b"a\x01b", "long": b"x" * 5000}.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InvalidInputError, match="token file"):
            read_token(path)
    with pytest.raises(InvalidInputError, match="cannot read"):
        read_token(tmp_path / "missing")
