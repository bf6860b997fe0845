"""Health probe for container HEALTHCHECKs: exit 0 when the server at ADDRESS is SERVING for SERVICE (readiness)."""

from __future__ import annotations

import sys

import grpc

from facefuse.servers.local import health_status


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m facefuse.servers.probe HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    try:
        status = health_status(args[0], args[1] if len(args) > 1 else "", timeout_s=2.0)
    except grpc.RpcError as exc:
        print(f"{args[0]}: {exc.code().name}", file=sys.stderr)
        return 1
    return 0 if status == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
