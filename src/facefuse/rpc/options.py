"""Channel and server options: message sizes and keepalive, the same on both ends of every hop."""

from __future__ import annotations

from typing import Any

DEFAULT_MAX_MESSAGE_MB = 64
DEFAULT_GRACE_S = 5.0

ChannelOptions = list[tuple[str, Any]]


def message_size_options(max_message_mb: int = DEFAULT_MAX_MESSAGE_MB) -> ChannelOptions:
    limit = max_message_mb * 1024 * 1024
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def channel_options(max_message_mb: int = DEFAULT_MAX_MESSAGE_MB) -> ChannelOptions:
    """Options of every facefuse client channel (gateway -> backends, client -> gateway)."""
    return message_size_options(max_message_mb) + [
        # Notice a peer that vanished without closing the connection (a killed container) within ~30 s.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


def server_options(max_message_mb: int = DEFAULT_MAX_MESSAGE_MB) -> ChannelOptions:
    """Options of every facefuse server: the same size limits, and keepalive pings allowed at our clients' rate."""
    return message_size_options(max_message_mb) + [
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]
