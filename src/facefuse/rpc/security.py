"""TLS, mutual TLS and a bearer token: how a facefuse server proves who it is and who may call it.

* A server with a certificate and key serves TLS only; given a CA as well, it also requires every
  client to present a certificate that CA signed (mutual TLS, how the gateway talks to its backends).
* A server with a token file answers ``UNAUTHENTICATED`` to any call without ``authorization: Bearer
  <token>`` metadata; the health service stays open, so probes and load balancers need no secret.
* Clients build their channel credentials here too, so both ends read the same PEM files the same way.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from facefuse.errors import InvalidInputError

AUTHORIZATION_KEY = "authorization"
BEARER = "Bearer "
OPEN_METHODS = ("/grpc.health.v1.Health/",)
"""Methods every caller may use without the token: probes (kubelet, load balancers) carry no secret."""
MAX_PEM_BYTES = 1 << 20
MAX_TOKEN_BYTES = 4096


def read_pem(path: str | Path, what: str) -> bytes:
    """A PEM file's bytes, with a message naming the flag's file when it is missing or not PEM."""
    path = Path(path)
    try:
        data = path.read_bytes() if path.stat().st_size <= MAX_PEM_BYTES else b""
    except OSError as exc:
        raise InvalidInputError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data:
        raise InvalidInputError(f"{what} {path}: not a PEM file "
                                f"(expected '-----BEGIN ...', at most {MAX_PEM_BYTES} bytes)")
    return data


def read_token(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace dropped): printable ASCII, not empty."""
    path = Path(path)
    try:
        raw = path.read_bytes()[:MAX_TOKEN_BYTES + 1]
    except OSError as exc:
        raise InvalidInputError(f"token file {path}: cannot read it ({exc.strerror or exc})") from None
    token = raw.decode("ascii", "replace").strip()
    if (not token or len(raw) > MAX_TOKEN_BYTES or not token.isascii() or not token.isprintable()
            or " " in token):
        raise InvalidInputError(f"token file {path}: expected one token of printable ASCII without spaces, "
                                f"1..{MAX_TOKEN_BYTES} bytes")
    return token


@dataclass(frozen=True)
class ServerTls:
    """``--tls-cert``/``--tls-key`` (TLS), plus ``--tls-ca`` (clients must present a certificate it signed)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = (read_pem(self.key, "--tls-key"), read_pem(self.cert, "--tls-cert"))
        ca = read_pem(self.client_ca, "--tls-ca") if self.client_ca is not None else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(frozen=True)
class ClientTls:
    """What a client trusts (``ca``; None = the system's roots) and, for mutual TLS, its own certificate."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidInputError("a client certificate needs both its certificate and its key file")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca, "CA file") if self.ca is not None else None,
            private_key=read_pem(self.key, "client key") if self.key is not None else None,
            certificate_chain=read_pem(self.cert, "client certificate") if self.cert is not None else None)


def secure_or_insecure_channel(target: str, options: list[tuple[str, Any]], tls: ClientTls | None) -> grpc.Channel:
    """A TLS channel when ``tls`` is given, else a plaintext one (in-cluster traffic a mesh secures)."""
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=options)


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (nothing when there is none)."""
    return ((AUTHORIZATION_KEY, BEARER + token),) if token else ()


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without the right bearer token (UNAUTHENTICATED); health stays open.

    The comparison takes constant time, so the answer's timing does not tell how much of a guess was right."""

    def __init__(self, token: str) -> None:
        if not token:
            raise InvalidInputError("the bearer token is empty")
        self._expected = (BEARER + token).encode()

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method.startswith(OPEN_METHODS):
            return continuation(handler_call_details)
        sent = [value for key, value in handler_call_details.invocation_metadata or () if key == AUTHORIZATION_KEY]
        if not sent:
            return _refusal("this server requires a bearer token: send 'authorization: Bearer <token>' metadata "
                            "(facefuse CLI: --token-file)")
        value = sent[0] if isinstance(sent[0], bytes) else str(sent[0]).encode("utf-8", "replace")
        if len(sent) != 1 or not hmac.compare_digest(value, self._expected):
            return _refusal("the bearer token is not valid for this server")
        return continuation(handler_call_details)


def _refusal(message: str) -> grpc.RpcMethodHandler:
    """A handler that answers UNAUTHENTICATED for any kind of RPC before reading a request."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # A stream-stream handler serves any call shape: the request stream is never read.
    return grpc.stream_stream_rpc_method_handler(refuse)
