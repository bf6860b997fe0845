"""TLS, mutual TLS, the bearer token and reflection switched off, on real server processes on loopback.

The certificates are made here (``cryptography``): a CA, a server certificate for 127.0.0.1/localhost,
a client certificate, and a second CA whose certificates no server trusts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from facefuse.client.api import GatewayClient, ImageInput
from facefuse.errors import AuthError, BackendUnavailableError
from facefuse.servers.local import free_port
from facefuse.v1 import fusion_pb2, fusion_pb2_grpc
from facefuse.v1.common_pb2 import InfoRequest
from facefuse.v1.gateway_pb2_grpc import GatewayStub

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token-for-tests"


@dataclass
class Issuer:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return Issuer(key, cert)


def issue(ca: Issuer, common_name: str, folder: Path, *, client: bool) -> tuple[Path, Path]:
    """A leaf certificate signed by ``ca`` (server: for 127.0.0.1 and localhost; client: clientAuth)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if not client:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    cert_path, key_path = folder / f"{common_name}.crt", folder / f"{common_name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class Pki:
    folder: Path
    ca: Path
    other_ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    stranger: tuple[Path, Path]  # a client certificate the other CA signed
    token_file: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = make_ca("facefuse test CA"), make_ca("someone else's CA")
    (folder / "ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    (folder / "other-ca.pem").write_bytes(other.cert.public_bytes(serialization.Encoding.PEM))
    (folder / "token").write_text(TOKEN + "\n")
    return Pki(folder, folder / "ca.pem", folder / "other-ca.pem", issue(ca, "server", folder, client=False),
               issue(ca, "gateway-client", folder, client=True), issue(other, "stranger", folder, client=True),
               folder / "token")


def _spawn(module: str, folder: Path, name: str, *args: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    port_file, log = folder / f"{name}.port", folder / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"facefuse.servers.{module}", "--port", "0", "--port-file",
                                 str(port_file), "--grace", "1", *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "FACEFUSE_ASSETS": ""})
    deadline = time.monotonic() + 120
    while not (port_file.is_file() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{name} did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    return proc, int(port_file.read_text()), log


@pytest.fixture(scope="module")
def secured(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """fusion on mutual TLS; a gateway on TLS with a token, no reflection, calling fusion with its client
    certificate; a second gateway whose client certificate fusion does not trust."""
    folder = tmp_path_factory.mktemp("secured")
    cert, key = pki.server
    health_port = free_port()
    procs = []
    try:
        fusion, fusion_port, _ = _spawn("fusion", folder, "fusion", "--pack", "open", "--tls-cert", str(cert),
                                        "--tls-key", str(key), "--tls-ca", str(pki.ca))
        procs.append(fusion)
        backend = ["--fusion", f"127.0.0.1:{fusion_port}", "--backend-ca", str(pki.ca)]
        gateway, gateway_port, _ = _spawn(
            "gateway", folder, "gateway", *backend, "--backend-cert", str(pki.client[0]), "--backend-key",
            str(pki.client[1]), "--tls-cert", str(cert), "--tls-key", str(key), "--auth-token-file",
            str(pki.token_file), "--no-reflection", "--health-port", str(health_port))
        procs.append(gateway)
        stranger, stranger_port, _ = _spawn("gateway", folder, "stranger", *backend, "--backend-cert",
                                            str(pki.stranger[0]), "--backend-key", str(pki.stranger[1]))
        procs.append(stranger)
        yield {"fusion": fusion_port, "gateway": gateway_port, "stranger": stranger_port, "health": health_port}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _credentials(pki: Pki, ca: Path | None = None, client: tuple[Path, Path] | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=(ca or pki.ca).read_bytes(),
                                        private_key=client[1].read_bytes() if client else None,
                                        certificate_chain=client[0].read_bytes() if client else None)


def _list_strategies(channel: grpc.Channel) -> fusion_pb2.ListStrategiesResponse:
    return fusion_pb2_grpc.FusionServiceStub(channel).ListStrategies(fusion_pb2.ListStrategiesRequest(), timeout=10)


def test_mutual_tls_accepts_only_clients_its_ca_signed(pki: Pki, secured: dict[str, int]) -> None:
    target = f"127.0.0.1:{secured['fusion']}"
    with grpc.secure_channel(target, _credentials(pki, client=pki.client)) as channel:
        assert _list_strategies(channel).default_strategy
    refused = {
        "plaintext": grpc.insecure_channel(target),
        "no client certificate": grpc.secure_channel(target, _credentials(pki)),
        "a certificate another CA signed": grpc.secure_channel(target, _credentials(pki, client=pki.stranger)),
        "the server checked against the wrong CA":
            grpc.secure_channel(target, _credentials(pki, pki.other_ca, pki.client)),
    }
    for case, channel in refused.items():
        with channel, pytest.raises(grpc.RpcError) as caught:
            _list_strategies(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, case


def test_the_gateway_reaches_its_backend_over_mutual_tls(pki: Pki, secured: dict[str, int]) -> None:
    with GatewayClient(f"127.0.0.1:{secured['gateway']}", ca=pki.ca, token=TOKEN) as client:
        fusion = {b.service: b for b in client.info().backends}["fusion"]
    assert fusion.ready, fusion.message
    # The same gateway code with a client certificate fusion does not trust: fusion is unreachable to it.
    with GatewayClient(f"127.0.0.1:{secured['stranger']}") as client:
        fusion = {b.service: b for b in client.info().backends}["fusion"]
    assert not fusion.ready and "unavailable" in fusion.message


def test_the_token_is_required_except_for_health(pki: Pki, secured: dict[str, int], astronaut_jpeg: bytes) -> None:
    address = f"127.0.0.1:{secured['gateway']}"
    for token, expected in ((None, "requires a bearer token"), ("wrong-token", "not valid")):
        with GatewayClient(address, ca=pki.ca, token=token) as client:
            with pytest.raises(AuthError, match=expected):
                client.info()
            with pytest.raises(AuthError, match=expected):
                list(client.process([ImageInput("a", astronaut_jpeg)], method="detect"))
    with GatewayClient(address, ca=pki.ca, token=TOKEN) as client:
        results = list(client.process([ImageInput("a", astronaut_jpeg)], method="detect"))
    assert results and results[0].status.code == 0
    with grpc.secure_channel(address, _credentials(pki)) as channel:  # no token: health answers anyway
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_plaintext_health_port_serves_health_only(secured: dict[str, int]) -> None:
    """What a kubelet gRPC probe (plaintext, no token) sees of a TLS server: health, and nothing else."""
    with grpc.insecure_channel(f"127.0.0.1:{secured['health']}") as channel:
        # liveness, and the gateway's readiness: NOT_SERVING, as this gateway has no mica or ofer to follow
        expected = {
            "": health_pb2.HealthCheckResponse.SERVING,
            "facefuse.v1.Gateway": health_pb2.HealthCheckResponse.NOT_SERVING,
        }
        for service, status in expected.items():
            request = health_pb2.HealthCheckRequest(service=service)
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
            assert reply.status == status, service
        with pytest.raises(grpc.RpcError) as caught:
            GatewayStub(channel).Info(InfoRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_tls_gateway_refuses_plaintext_and_untrusted_clients(pki: Pki, secured: dict[str, int]) -> None:
    address = f"127.0.0.1:{secured['gateway']}"
    for kwargs in ({}, {"ca": pki.other_ca}):
        with GatewayClient(address, token=TOKEN, **kwargs) as client, pytest.raises(BackendUnavailableError):
            client.info()


def _reflection_services(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                        timeout=10, metadata=metadata)
    return [service.name for reply in replies for service in reply.list_services_response.service]


def test_reflection_can_be_switched_off(pki: Pki, secured: dict[str, int]) -> None:
    with grpc.secure_channel(f"127.0.0.1:{secured['gateway']}", _credentials(pki)) as channel, \
            pytest.raises(grpc.RpcError) as caught:
        _reflection_services(channel, (("authorization", f"Bearer {TOKEN}"),))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(f"127.0.0.1:{secured['stranger']}") as channel:  # reflection on by default
        assert "facefuse.v1.Gateway" in _reflection_services(channel)


def test_the_cli_takes_the_ca_and_token(pki: Pki, secured: dict[str, int], astronaut_jpeg: bytes,
                                        tmp_path: Path) -> None:
    image = tmp_path / "astronaut.jpg"
    image.write_bytes(astronaut_jpeg)
    base = [sys.executable, "-m", "facefuse.client.cli", "detect", str(image),
            "--gateway", f"127.0.0.1:{secured['gateway']}", "--ca", str(pki.ca), "--no-progress"]
    ok = subprocess.run([*base, "-o", str(tmp_path / "ok"), "--token-file", str(pki.token_file)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    wrong = tmp_path / "wrong-token"
    wrong.write_text("nope")
    refused = subprocess.run([*base, "-o", str(tmp_path / "refused"), "--token-file", str(wrong)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "not valid" in refused.stderr and "Traceback" not in refused.stderr


def test_bad_tls_flags_are_clear_start_up_errors(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    for args, expected in ((["--tls-cert", str(pki.server[0])], "both --tls-cert and --tls-key"),
                           (["--tls-ca", str(pki.ca)], "needs --tls-cert"),
                           (["--tls-cert", str(not_pem), "--tls-key", str(pki.server[1])], "not a PEM file"),
                           (["--auth-token-file", str(tmp_path / "missing")], "cannot read")):
        out = subprocess.run([sys.executable, "-m", "facefuse.servers.fusion", "--pack", "open", "--port", "0", *args],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "FACEFUSE_ASSETS": ""})
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert expected in out.stderr and "Traceback" not in out.stderr, (args, out.stderr[-2000:])

