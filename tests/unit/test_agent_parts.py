"""The agent's pure parts, without forking anything: spec parsing, paths, status lines."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from pathlib import Path

import pytest

from hull.agent import rootfs, spawn
from hull.agent import syscalls as sc
from hull.agent.channel import Channel, find_port
from hull.agent.loop import Loop
from hull.agent.process import exit_status
from hull.agent.spec import SpecError, parse_container, parse_mount_options, parse_process
from hull.agentapi import framing, mountinfo
from hull.agentapi.framing import Frame, Kind

# ---------------------------------------------------------------------------- spec


def test_process_defaults_and_fields() -> None:
    proc = parse_process({"args": ["sh"], "env": ["A=1", "PATH=/x", "A=2"], "cwd": "/w",
                          "user": {"uid": 5, "gid": 6, "additionalGids": [7], "umask": 0o77},
                          "terminal": True, "consoleSize": {"height": 24, "width": 80},
                          "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 20}],
                          "noNewPrivileges": True, "oomScoreAdj": 100})
    assert proc.args == ("sh",)
    assert proc.getenv("A") == "2" and proc.getenv("PATH") == "/x" and proc.getenv("B") is None
    assert (proc.user.uid, proc.user.gid, proc.user.additional_gids, proc.user.umask) == \
        (5, 6, (7,), 0o77)
    assert proc.terminal and proc.console_size == (24, 80)
    assert [(r.resource, r.soft, r.hard) for r in proc.rlimits] == [(7, 10, 20)]
    assert proc.no_new_privileges and proc.oom_score_adj == 100
    bare = parse_process({"args": ["true"]})
    assert (bare.cwd, bare.user.uid, bare.user.umask, bare.terminal) == ("/", 0, 0o022, False)


@pytest.mark.parametrize(("proc", "word"), [
    ({"args": []}, "args"),
    ({"args": "sh"}, "args"),
    ({"args": ["sh"], "cwd": "relative"}, "cwd"),
    ({"args": ["sh"], "user": {"uid": -1}}, "uid"),
    ({"args": ["sh"], "terminal": "yes"}, "terminal"),
    ({"args": ["sh"], "rlimits": [{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}]}, "rlimit"),
    ({"args": ["s\0h"]}, "args"),
])
def test_process_rejects(proc: dict[str, object], word: str) -> None:
    with pytest.raises(SpecError, match=word):
        parse_process(proc)


def test_mount_options_follow_runc() -> None:
    flags, propagation, data = parse_mount_options(
        ("nosuid", "noexec", "ro", "rw", "mode=755", "size=1k", "rprivate", "tmpcopyup"))
    assert flags == sc.MS_NOSUID | sc.MS_NOEXEC
    assert propagation == sc.MS_PRIVATE | sc.MS_REC
    assert data == "mode=755,size=1k"
    assert parse_mount_options(("rbind", "ro"))[0] == sc.MS_BIND | sc.MS_REC | sc.MS_RDONLY


def test_container_spec() -> None:
    cs = parse_container({
        "process": {"args": ["sh"]}, "root": {"readonly": True}, "hostname": "h",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/data", "type": "bind", "source": "/x", "options": ["ro"]}],
        "linux": {"devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
                  "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"],
                  "sysctl": {"net.ipv4.ip_forward": "1"}}})
    assert cs.readonly_root and cs.hostname == "h"
    assert [m.destination for m in cs.mounts] == ["/proc", "/data"]
    assert not cs.mounts[0].is_bind and cs.mounts[1].is_bind
    assert cs.devices[0].path == "/dev/fuse" and cs.devices[0].mode == 0o666
    assert cs.sysctl == (("net.ipv4.ip_forward", "1"),)
    with pytest.raises(SpecError, match="destination"):
        parse_container({"process": {"args": ["sh"]}, "mounts": [{"destination": "x"}]})
    with pytest.raises(SpecError, match="sysctl"):
        parse_container({"process": {"args": ["sh"]}, "linux": {"sysctl": {"../x": "1"}}})


# ---------------------------------------------------------------------------- paths


def test_secure_join_stays_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "abs").symlink_to("/etc")
    (root / "up").symlink_to("../../../../outside")
    (root / "etc" / "self").symlink_to("../etc/self")
    r = str(root)
    assert rootfs.secure_join(r, "/etc/passwd") == f"{r}/etc/passwd"
    assert rootfs.secure_join(r, "/../../etc") == f"{r}/etc"
    assert rootfs.secure_join(r, "/abs/x") == f"{r}/etc/x"
    assert rootfs.secure_join(r, "/up/y") == f"{r}/outside/y"
    assert rootfs.secure_join(r, "/") == r
    with pytest.raises(OSError, match="many levels"):
        rootfs.secure_join(r, "/etc/self/z")


def test_resolve_follows_path(tmp_path: Path) -> None:
    exe = tmp_path / "bin" / "tool"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    plain = tmp_path / "bin" / "data"
    plain.write_text("")
    assert spawn.resolve("tool", f"/nonexistent:{exe.parent}") == str(exe)
    assert spawn.resolve(str(exe), None) == str(exe)
    with pytest.raises(spawn.ExecError, match="not found in \\$PATH") as missing:
        spawn.resolve("nope", str(exe.parent))
    assert missing.value.code == 127
    if os.geteuid() != 0:  # root may execute anything with an x bit only
        with pytest.raises(spawn.ExecError, match="permission denied") as denied:
            spawn.resolve("data", str(exe.parent))
        assert denied.value.code == 126
    with pytest.raises(spawn.ExecError, match='exec: "/no/such": no such file') as absent:
        spawn.resolve("/no/such", None)
    assert absent.value.code == 127


def test_mountinfo_unescape() -> None:
    assert mountinfo.unescape(b"/a\\040b\\134c") == "/a b\\c"
    assert mountinfo.unescape(b"/plain") == "/plain"


def test_mountinfo_mount_points(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_bytes(b"22 1 0:21 / / rw - ext4 /dev/vda rw\n"
                      b"23 22 0:22 / /a\\040b rw shared:1 - tmpfs none rw\n"
                      b"short line\n")
    assert mountinfo.mount_points(str(table)) == ["/", "/a b"]


# ---------------------------------------------------------------------------- status, exits


def test_status_pipe_lines() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    pipe = spawn.StatusPipe(r)
    os.write(w, b"P12\nWsome")
    assert pipe.read() == [("P", "12")]
    os.write(w, b" warning\nR\n")
    os.close(w)
    assert pipe.read() == [("W", "some warning"), ("R", "")]
    assert pipe.eof
    os.close(r)


def test_exit_status_shell_convention() -> None:
    assert exit_status(0) == (0, None)
    assert exit_status(42 << 8) == (42, None)
    assert exit_status(signal.SIGKILL) == (137, 9)


# ---------------------------------------------------------------------------- channel


def test_find_port(tmp_path: Path) -> None:
    for port, name in (("vport0p1", "org.qemu.guest_agent.0"), ("vport1p1", "hull.agent")):
        (tmp_path / port).mkdir()
        (tmp_path / port / "name").write_text(name + "\n")
    assert find_port("hull.agent", str(tmp_path)) == "/dev/vport1p1"
    assert find_port("other", str(tmp_path)) is None
    assert find_port("hull.agent", str(tmp_path / "missing")) is None


def test_channel_frames_both_ways_and_drops_garbage() -> None:
    host, guest = socket.socketpair()
    loop = Loop()
    got: list[Frame] = []
    resets: list[bool] = []
    channel = Channel(loop, got.append, lambda: resets.append(True), guest.detach())
    channel.start()
    big = os.urandom(framing.MAX_DATA_CHUNK)
    # A chunk is larger than a socket buffer: send from a thread while the loop reads.
    sender = threading.Thread(target=host.sendall, args=(
        Frame(Kind.REQUEST, 0, b"{}").encode() + Frame(Kind.DATA, 3, big).encode(),))
    sender.start()
    while len(got) < 2:
        loop.run_once(1.0)
    sender.join()
    assert got == [Frame(Kind.REQUEST, 0, b"{}"), Frame(Kind.DATA, 3, big)]
    channel.send_parts(Kind.DATA, 5, big)
    decoder = framing.Decoder()
    frames: list[Frame] = []
    host.setblocking(False)
    while not frames:  # the channel flushes its queue as the loop runs
        loop.run_once(0.01)
        with contextlib.suppress(BlockingIOError):
            frames += decoder.feed(host.recv(1 << 20))
    host.setblocking(True)
    assert frames == [Frame(Kind.DATA, 5, big)]
    host.sendall(b"\xff" * framing.HEADER_SIZE)  # garbage: a framing error ends the agent
    while loop.running:
        loop.run_once(1.0)
    assert channel.exit_status == 1
    assert channel.fd == -1  # the channel closed its fd
    host.close()
