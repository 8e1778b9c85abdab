"""Operability with real VMs: hull debug, hull logs, hull monitor, annotations, logging,
failure messages."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from hull.config import settings
from hull.image import initrd
from tests.integration.cli_helpers import (
    Cli,
    become_subreaper,
    cleanup,
    reap_all,
    scrape_monitor,
)
from tests.integration.conftest import BundleFactory


@pytest.fixture
def cli(state_root: Path, tmp_path: Path, guest_assets_ready: None) -> Iterator[Cli]:
    become_subreaper()
    yield Cli(state_root, tmp_path)
    reap_all()


@pytest.fixture(scope="session")
def busybox_image() -> Path:
    """A guest image with /bin/busybox (not made current: other tests keep theirs)."""
    result = initrd.build_image(settings.load(), publish=False, with_busybox=True)
    return result.asset.path / "initrd.img"


def config_file(path: Path, **hypervisor: object) -> tuple[str, ...]:
    lines = ["[hypervisor]"]
    for key, value in hypervisor.items():
        lines.append(f"{key} = {json.dumps(value)}")
    lines += ["[runtime]", 'annotation_allowlist = ["hypervisor.default_memory_mib"]']
    path.write_text("\n".join(lines) + "\n")
    return ("--config", str(path))


def running(cli: Cli, bundle: BundleFactory, cid: str, extra: tuple[str, ...] = (),
            **spec: object) -> None:
    path = bundle(["sleep", "60"], **spec)
    done, _, err = cli.create(cid, path, extra=extra)
    assert done.returncode == 0, err.read_text()
    started = cli("start", cid, extra=extra)
    assert started.returncode == 0, started.stderr


def test_debug_console_runs_uname_in_the_guest(cli: Cli, bundle: BundleFactory,
                                                tmp_path: Path, busybox_image: Path) -> None:
    extra = config_file(tmp_path / "debug.toml", image=str(busybox_image), debug_console=True)
    with cleanup(cli, "dbg"):
        running(cli, bundle, "dbg", extra)
        done = cli("debug", "dbg", "--", "uname", "-a", extra=extra)
        assert done.returncode == 0, done.stderr
        out = done.stdout.decode()
        # the guest's kernel, not the host's: Hull's guest kernel is "...-hull"
        assert out.startswith("Linux ") and "-hull " in out, out
        # outside the container: the guest root has the agent, the container has not
        done = cli("debug", "dbg", "--", "sh", "-c", "ls /usr/lib/hull >/dev/null; exit 7",
                   extra=extra)
        assert done.returncode == 7, done.stderr
        # the agent's own log names the debug process
        logs = cli("logs", "--agent", "dbg", extra=extra)
        assert logs.returncode == 0, logs.stderr
        assert "uname -a" in logs.stdout.decode()


def test_debug_console_is_refused_when_not_enabled(cli: Cli, bundle: BundleFactory) -> None:
    with cleanup(cli, "nodbg"):
        running(cli, bundle, "nodbg")
        done = cli("debug", "nodbg", "--", "uname", "-a")
        assert done.returncode != 0
        assert b"debug console is disabled" in done.stderr
        assert b"hypervisor.debug_console = true" in done.stderr


def test_logs_returns_the_console_and_the_agent_log(cli: Cli, bundle: BundleFactory) -> None:
    with cleanup(cli, "lg"):
        running(cli, bundle, "lg")
        console = cli("logs", "--console", "lg").stdout.decode()
        agent = cli("logs", "--agent", "lg").stdout.decode()
        assert "hull-agent: hello from the host" in console
        assert agent.splitlines()[0].startswith("hello from the host (protocol ")
        assert "hull-agent:" not in agent and not re.search(r"^\[ *\d+\.\d+\]", agent, re.M)
        both = cli("logs", "lg").stdout.decode()
        assert "==> guest console" in both and "==> hull agent <==\nhello from" in both


def test_metrics_endpoint_has_the_sandbox_overhead(cli: Cli, bundle: BundleFactory) -> None:
    with cleanup(cli, "mon"):
        running(cli, bundle, "mon")
        metrics = scrape_monitor(cli.root)
        overhead = metrics['hull_sandbox_host_overhead_total_bytes{sandbox="mon"}']
        qemu = metrics['hull_sandbox_host_overhead_bytes{component="qemu",sandbox="mon"}']
        assert 10e6 < qemu <= overhead < 2e9
        assert metrics['hull_sandbox_agent_up{sandbox="mon"}'] == 1
        assert metrics['hull_sandbox_containers{sandbox="mon"}'] == 1
        assert 0 < metrics['hull_sandbox_boot_seconds{sandbox="mon"}'] < 120
        assert 0 < metrics['hull_sandbox_agent_rtt_seconds{sandbox="mon"}'] < 2
        assert metrics['hull_sandbox_guest_memory_total_bytes{sandbox="mon"}'] > 100e6
        assert metrics['hull_sandboxes{status="running"}'] == 1


def test_annotation_outside_the_allow_list_is_rejected(cli: Cli, bundle: BundleFactory,
                                                       tmp_path: Path) -> None:
    extra = config_file(tmp_path / "c.toml")

    def annotate(value: dict[str, str]) -> object:
        return lambda spec: spec.__setitem__("annotations", value)

    path = bundle(["true"], mutate=annotate({"io.hull.config.hypervisor.path": "/bin/evil"}))
    done, _, err = cli.create("ann", path, extra=extra)
    assert done.returncode != 0
    assert err.read_text().strip() == (
        "annotation io.hull.config.hypervisor.path is not allowed: add 'hypervisor.path' "
        "to runtime.annotation_allowlist in the configuration to allow it")
    assert not (cli.root / "ann").exists()
    # an allowed one applies: the guest sees the memory the annotation asks for
    path = bundle(["sh", "-c", "head -1 /proc/meminfo"], mutate=annotate(
        {"io.hull.config.hypervisor.default_memory_mib": "320"}))
    done = cli("run", "--bundle", str(path), "ann2", extra=extra)
    assert done.returncode == 0, done.stderr
    kib = int(done.stdout.split()[1])
    assert 280 * 1024 < kib <= 320 * 1024, done.stdout


def test_json_logs_of_every_component_carry_the_container_id(
        cli: Cli, bundle: BundleFactory, tmp_path: Path) -> None:
    log = tmp_path / "hull.log"
    extra = ("--log", str(log), "--log-format", "json", "--debug")
    with cleanup(cli, "jl"):
        running(cli, bundle, "jl", extra)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries and all(e.get("id") == "jl" for e in entries), entries[:5]
    assert any("ready" in e["msg"] for e in entries)  # from the proxy


def test_a_vm_that_fails_to_boot_shows_the_console(cli: Cli, bundle: BundleFactory,
                                                   tmp_path: Path) -> None:
    extra = config_file(tmp_path / "c.toml", kernel_params="rdinit=/nonexistent",
                        boot_timeout=30.0)
    done = cli("run", "--bundle", str(bundle(["true"])), "boot", extra=extra)
    assert done.returncode != 0
    message = done.stderr.decode()
    assert "vm of boot" in message and "last guest console lines:" in message
    assert "Kernel panic" in message


def test_a_broken_kernel_path_names_it(cli: Cli, bundle: BundleFactory,
                                       tmp_path: Path) -> None:
    junk = tmp_path / "vmlinux"
    junk.write_text("not a kernel\n")
    for kernel, expected in ((tmp_path / "nope", f"guest kernel {tmp_path / 'nope'} does "
                              "not exist"), (junk, "vm of kb failed to start: qemu exited")):
        extra = config_file(tmp_path / "c.toml", kernel=str(kernel))
        done = cli("run", "--bundle", str(bundle(["true"])), "kb", extra=extra)
        assert done.returncode != 0
        assert expected in done.stderr.decode()
