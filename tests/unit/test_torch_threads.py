"""``--torch-threads`` / ``FACEFUSE_TORCH_THREADS``: validated, applied before the models load (issue 18)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from facefuse.servers.threads import THREADS_ENV, add_thread_argument, parse_torch_threads, usable_cpus


def test_auto_shares_the_usable_cpus_between_the_two_model_services() -> None:
    assert parse_torch_threads("auto") == max(1, usable_cpus() // 2)
    assert parse_torch_threads(" AUTO ") == parse_torch_threads("auto")


@pytest.mark.parametrize("text", ["1", "2", "256"])
def test_a_whole_number_is_taken_as_is(text: str) -> None:
    assert parse_torch_threads(text) == int(text)


@pytest.mark.parametrize("text", ["0", "257", "-1", "1.5", "", "two", "²"])
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_torch_threads(text)


def test_the_environment_gives_the_default_and_the_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "3")
    parser = argparse.ArgumentParser()
    add_thread_argument(parser)
    assert parser.parse_args([]).torch_threads == 3
    assert parser.parse_args(["--torch-threads", "1"]).torch_threads == 1


@pytest.mark.parametrize("service", ["mica", "ofer", "fusion"])
def test_a_bad_value_is_a_usage_error_before_any_model_loads(service: str) -> None:
    done = subprocess.run([sys.executable, "-m", f"facefuse.servers.{service}", "--torch-threads", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--torch-threads" in done.stderr and "expected 1..256" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_service_runs_torch_with_its_thread_count(tmp_path) -> None:
    """The fusion service (open pack, no assets) started with 1 thread: its process reports 1 thread."""
    script = (
        "import sys, torch\n"
        "from facefuse.servers import base\n"
        "def build(args):\n"
        "    print('threads', torch.get_num_threads(), flush=True)\n"
        "    raise SystemExit(0)\n"
        "from facefuse.servers.fusion import add_arguments\n"
        "base.run_cli('t', 't', add_arguments, build, sys.argv[1:])\n"
    )
    for threads in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", script, "--torch-threads", threads], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"threads {threads}" in done.stdout


def test_compose_sets_every_torch_service_s_threads_explicitly() -> None:
    import re
    from pathlib import Path

    from ruamel.yaml import YAML

    compose = YAML(typ="safe", pure=True).load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
    for name in ("mica", "ofer", "fusion"):
        value = compose["services"][name]["environment"][THREADS_ENV]
        default = re.fullmatch(r"\$\{(FACEFUSE_[A-Z]+_THREADS):-([^}]+)\}", value)
        assert default is not None, f"{name}: {value!r} is not ${{FACEFUSE_<SERVICE>_THREADS:-default}}"
        parse_torch_threads(default.group(2))  # the default is a valid value
    assert "environment" not in compose["services"]["gateway"] or THREADS_ENV not in compose["services"]["gateway"][
        "environment"], "the gateway runs no torch"
