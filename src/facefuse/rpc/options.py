"""Channel and server options: message sizes and keepalive, the same on both ends of every hop."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

DEFAULT_MAX_MESSAGE_MB = 64
DEFAULT_GRACE_S = 5.0

ChannelOptions = list[tuple[str, Any]]


def message_size_options(max_message_mb: int = DEFAULT_MAX_MESSAGE_MB) -> ChannelOptions:
    limit = max_message_mb * 1024 * 1024
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def channel_options(max_message_mb: int = DEFAULT_MAX_MESSAGE_MB) -> ChannelOptions:
    """Options of every facefuse client channel (gateway -> backends, client -> gateway)."""
    return [
        *message_size_options(max_message_mb),
        # Notice a peer that vanished without closing the connection (a killed container) within ~30 s.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


def server_options(max_message_mb: int = DEFAULT_MAX_MESSAGE_MB) -> ChannelOptions:
    """Options of every facefuse server: the same size limits, and keepalive pings allowed at our clients' rate."""
    return [
        *message_size_options(max_message_mb),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


RETRIED_METHODS: dict[str, tuple[str, ...]] = {
    # Calls that change nothing on the server and give the same answer when repeated (a Sample is seeded:
    # seed 0 when the caller sets none), so a retry on another replica is safe.
    "facefuse.v1.MicaService": ("Predict", "Info"),
    "facefuse.v1.OferService": ("Sample", "Rank", "Info"),
    "facefuse.v1.FusionService": ("Fuse", "ListStrategies", "Info"),
}
RETRY_MAX_ATTEMPTS = 3
"""One call and up to two retries: with two replicas, the retry lands on the other one (round robin)."""


def backend_service_config(max_attempts: int = RETRY_MAX_ATTEMPTS) -> dict[str, Any]:
    """The gRPC service config of the gateway's backend channels: round robin over every address the
    target resolves to (all replicas behind a headless Service or an address list), and a retry policy
    for the idempotent calls on UNAVAILABLE (the replica died or went away). No hedging: a model call
    costs seconds of a replica's compute, so sending it twice on purpose would halve the capacity.

    gRPC retries only until the first response message arrives; ``OferService.Sample`` sends its
    first message once all samples are ready, so a replica that dies while sampling is retried too."""
    names = [{"service": service, "method": method}
             for service, methods in RETRIED_METHODS.items() for method in methods]
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{
            "name": names,
            "retryPolicy": {
                "maxAttempts": max_attempts,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }],
    }


def backend_channel_options(max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
                            tls_name: str | None = None) -> ChannelOptions:
    """Options of the gateway's channels to the model services: ``channel_options`` plus load balancing
    and retries (``backend_service_config``); ``tls_name`` overrides the name the backends' TLS
    certificate is checked against (an address list has no single host name)."""
    options = [
        *channel_options(max_message_mb),
        ("grpc.service_config", json.dumps(backend_service_config())),
        ("grpc.enable_retries", 1),
        # The service config above is ours: a DNS TXT record must not replace it.
        ("grpc.service_config_disable_resolution", 1),
        # gRPC keeps a request to resend it, but only up to this size (default 256 KiB): a Face with its
        # crops is larger, and a call whose request did not fit is never retried.
        ("grpc.per_rpc_retry_buffer_size", max_message_mb * 1024 * 1024),
    ]
    if tls_name:
        options.append(("grpc.ssl_target_name_override", tls_name))
    return options


def backend_target(address: str) -> str:
    """A gRPC target for one backend address: ``host:port``, a resolver URI (``dns:///ofer:50052``, a
    headless Service, resolves to every replica), or a comma-separated list of ``ip:port`` replicas
    (made an ``ipv4:``/``ipv6:`` target; host names in a list need a DNS name instead)."""
    address = address.strip()
    if "," not in address:
        return address
    parts = [part.strip() for part in address.split(",")]
    if not all(parts):
        raise ValueError(f"backend address list {address!r} has an empty entry")
    families = {_ip_family(part) for part in parts}
    if None in families or len(families) != 1:
        raise ValueError(f"backend address list {address!r}: a list takes ip:port entries of one family "
                         "(127.0.0.1:50051,127.0.0.1:50052 or [::1]:50051,...); for host names use dns:///NAME:PORT")
    return f"{families.pop()}:{','.join(parts)}"


def _ip_family(host_port: str) -> str | None:
    host, sep, port = host_port.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return None
    try:
        ip = ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        return None
    return "ipv4" if ip.version == 4 else "ipv6"
