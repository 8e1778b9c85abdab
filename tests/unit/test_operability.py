"""hull check, hull env, logging with the container id, hull logs (no VM; hull monitor:
test_monitor.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from hull import logids
from hull.agent import debug as agent_debug
from hull.agentapi import schema
from hull.cli.env import to_toml
from hull.config import settings
from hull.runtime import guestlog, hostcheck

HULL = [sys.executable, "-m", "hull"]


def write_config(tmp_path: Path) -> Path:
    f = tmp_path / "c.toml"
    f.write_text(f'[runtime]\nasset_dir = "{tmp_path / "assets"}"\n')
    return f


# ---------------------------------------------------------------------- hull check


def test_check_without_qemu_on_path_names_it_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    env = {**os.environ, "PATH": str(tmp_path / "bin")}
    done = subprocess.run([*HULL, "--config", str(write_config(tmp_path)), "check"],
                          capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 1
    first = done.stdout.splitlines()[:2]
    assert first[0].startswith("FAIL  qemu") and "qemu-system-x86_64" in first[0]
    assert "not found on PATH" in first[0]
    assert "fix: apt-get install qemu-system-x86" in first[1]

    done = subprocess.run([*HULL, "--config", str(write_config(tmp_path)), "check",
                           "--format", "json"], capture_output=True, text=True, env=env,
                          check=False)
    report = json.loads(done.stdout)
    assert done.returncode == 1 and report["ok"] is False
    qemu = next(f for f in report["findings"] if f["item"] == "qemu")
    assert not qemu["ok"] and qemu["required"] and "qemu-system-x86" in qemu["fix"]
    kernel = next(f for f in report["findings"] if f["item"] == "kernel")
    assert not kernel["ok"] and "hull kernel build" in kernel["fix"]


def test_optional_findings_do_not_fail_the_check() -> None:
    findings = [hostcheck.Finding("qemu", True, "x"),
                hostcheck.Finding("podman", False, "missing", "install", required=False)]
    assert hostcheck.healthy(findings)
    assert not hostcheck.healthy([*findings, hostcheck.Finding("image", False, "stale")])


def test_ksm_finding_names_the_settings_that_are_off(tmp_path: Path) -> None:
    ksm = tmp_path / "ksm"
    missing = hostcheck.check_ksm(str(ksm))
    assert not missing.ok and not missing.required and "CONFIG_KSM" in missing.fix
    ksm.mkdir()
    (ksm / "run").write_text("0\n")
    (ksm / "use_zero_pages").write_text("0\n")
    off = hostcheck.check_ksm(str(ksm))
    assert not off.ok and f"{ksm}/run = 0" in off.detail
    assert off.fix == f"echo 1 > {ksm}/use_zero_pages; echo 1 > {ksm}/run"
    (ksm / "run").write_text("1\n")
    no_zero = hostcheck.check_ksm(str(ksm))
    assert not no_zero.ok and "use_zero_pages = 0" in no_zero.detail
    (ksm / "use_zero_pages").write_text("1\n")
    assert hostcheck.check_ksm(str(ksm)).ok


def test_tun_cgroups_containerd_podman(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not hostcheck.check_tun(str(tmp_path / "tun")).ok
    assert "modprobe tun" in hostcheck.check_tun(str(tmp_path / "tun")).fix
    (tmp_path / "cg").mkdir()
    assert not hostcheck.check_cgroups(str(tmp_path / "cg")).ok
    (tmp_path / "cg" / "cgroup.controllers").write_text("memory\n")
    assert "cgroup v2" in hostcheck.check_cgroups(str(tmp_path / "cg")).detail
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert "apt-get install containerd" in hostcheck.check_containerd().fix
    for name in ("containerd", "podman", hostcheck.SHIM_V2):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    conf = tmp_path / "config.toml"
    conf.write_text("version = 2\n")
    finding = hostcheck.check_containerd(conf)
    assert not finding.ok and "deploy/containerd-hull.toml" in finding.fix
    conf.write_text('runtime_type = "io.containerd.hull.v2"\n')
    assert hostcheck.check_containerd(conf).ok
    cc = tmp_path / "containers.conf"
    assert not hostcheck.check_podman((cc,)).ok
    cc.write_text('[engine.runtimes]\nhull = ["/usr/local/bin/hull"]\n')
    assert hostcheck.check_podman((cc,)).ok


# ---------------------------------------------------------------------- hull env


def test_env_prints_configuration_versions_and_paths(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    done = subprocess.run([*HULL, "--config", str(config), "--root", str(tmp_path / "r"),
                           "env"], capture_output=True, text=True, check=True)
    data = tomllib.loads(done.stdout)
    assert data["hull"]["version"] and data["hull"]["python"]
    assert set(data["components"]) >= {"qemu", "kernel_release", "image_key", "agent_hash"}
    assert data["paths"]["config"] == str(config)
    assert data["paths"]["root"] == str(tmp_path / "r")
    assert data["configuration"]["runtime"]["asset_dir"] == str(tmp_path / "assets")
    assert data["configuration"]["hypervisor"] == settings.Config().as_dict()["hypervisor"]
    done = subprocess.run([*HULL, "--config", str(config), "env", "--format", "json"],
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["configuration"]["runtime"]["annotation_allowlist"] == []


def test_toml_writer_round_trips() -> None:
    data = {"a": {"s": 'x "y" \\ ü', "i": 3, "f": 1.5, "b": False, "l": ["p", "q"],
                  "t": {"k.dotted": "v"}}}
    assert tomllib.loads(to_toml(data)) == data


# ---------------------------------------------------------------------- logging


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_every_record_carries_the_container_id(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "log"
    try:
        logids.setup_logging(str(path), fmt, False, container_id="ctr-1")
        logging.getLogger("hull.proxyd").error("vm died")
    finally:
        logids.setup_logging(None, "text", False)
    line = path.read_text().strip()
    if fmt == "json":
        entry = json.loads(line)
        assert entry["id"] == "ctr-1" and entry["msg"] == "vm died" and entry["level"] == "error"
    else:
        assert "ERROR [ctr-1] vm died" in line


# ---------------------------------------------------------------------- guest logs


def test_agent_lines_are_picked_out_of_the_console() -> None:
    console = ("[    0.1] Linux version 6.1\nhull-agent: mounted /proc\n"
               "[    0.2] random: crng init done hull-agent: interleaved\nplain\n")
    assert guestlog.agent_lines(console) == ["mounted /proc", "interleaved"]


def test_logs_verb_shows_console_and_agent(tmp_path: Path) -> None:
    cdir = tmp_path / "root" / "c1"
    cdir.mkdir(parents=True)
    (cdir / "console.log").write_text("[ 0.1] kernel\r\nhull-agent: hello\n")
    run = [*HULL, "--root", str(tmp_path / "root"), "logs"]
    agent = subprocess.run([*run, "--agent", "c1"], capture_output=True, text=True, check=True)
    assert agent.stdout == "hello\n"
    console = subprocess.run([*run, "--console", "c1"], capture_output=True, text=True,
                             check=True)
    assert console.stdout == "[ 0.1] kernel\nhull-agent: hello\n"
    both = subprocess.run([*run, "c1"], capture_output=True, text=True, check=True).stdout
    assert "==> hull agent <==\nhello" in both
    missing = subprocess.run([*run, "nope"], capture_output=True, text=True, check=False)
    assert missing.returncode != 0 and "nope" in missing.stderr


# ---------------------------------------------------------------------- agent helpers


def test_guest_stats_from_proc(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text("MemTotal: 1000 kB\nMemFree: 10 kB\n"
                                      "MemAvailable: 600 kB\n")
    assert agent_debug.meminfo(str(tmp_path / "meminfo")) == {
        "MemTotal": 1024000, "MemAvailable": 614400}
    (tmp_path / "stat").write_text("cpu  10 0 5 100 1 0 0 0 0 0\n")
    user, system, idle = agent_debug.cpu_usec(str(tmp_path / "stat"))
    tick = os.sysconf("SC_CLK_TCK")
    assert (user, system, idle) == (10 * 10**6 // tick, 5 * 10**6 // tick, 101 * 10**6 // tick)
    stats = schema.SandboxStats.from_json(agent_debug.stats(2))
    assert stats.containers == 2 and stats.memory_total > 0


def test_debug_exec_is_enabled_only_by_the_kernel_command_line(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 quiet\n")
    assert not agent_debug.enabled(str(cmdline))
    cmdline.write_text("console=ttyS0 hull.debug_console=1\n")
    assert agent_debug.enabled(str(cmdline))


@pytest.mark.parametrize("params, message", [
    ({"exec_id": "", "args": ["sh"]}, "exec_id"),
    ({"exec_id": "d", "args": []}, "args must name"),
    ({"exec_id": "d", "args": "sh"}, "list of strings"),
    ({"exec_id": "d", "args": ["sh", 1]}, "list of strings"),
])
def test_debug_exec_schema(params: dict[str, object], message: str) -> None:
    with pytest.raises(schema.SchemaError, match=message):
        schema.DebugExec.from_json(params)


# ---------------------------------------------------------------------- progress


def test_build_progress_is_plain_lines_off_a_terminal(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from hull.cli import image
    from hull.image import kernel

    for ci in ("", "true"):
        monkeypatch.setenv("CI", ci)
        with image._progress() as progress:
            progress("resolve", "package versions")
            progress("pack", "newc cpio")
        bar = kernel.make_progress()
        assert isinstance(bar, kernel.PlainProgress)
        bar.phase("configure")
        bar.make_line("  CC      kernel/fork.o")  # make's chatter stays out of logs
        bar.close()
        err = capsys.readouterr().err
        assert "\x1b" not in err
        assert err.splitlines() == ["resolve: package versions", "pack: newc cpio",
                                    "hull: configure"]


# ---------------------------------------------------------------------- --help


def test_every_command_has_help() -> None:
    import argparse

    from hull.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listed = {a.dest for a in sub._choices_actions}
    hidden = {"proxy"}  # started by hull itself, not for people
    assert set(sub.choices) - listed == hidden
    for name, command in sub.choices.items():
        if name in hidden:
            continue
        text = command.format_help()
        assert command.description or name in listed, name
        assert "usage: hull " + name in text, name
    for verb in ("check", "env", "logs", "debug", "monitor"):
        assert sub.choices[verb].description, verb
