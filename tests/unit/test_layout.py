"""The CLI's file layouts (hull.runtime.layout), a pooled clone's warm-up against a fake
agent (hull.runtime.warmup), and the phases a restored sandbox logs."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from hull.agentapi import schema
from hull.agentapi.framing import Frame, Kind
from hull.config.settings import Config
from hull.errors import HullError
from hull.oci.bundle import Bundle
from hull.runtime import layout, sharedfs, warmup
from hull.runtime.sandbox import BootProfile
from tests.unit.test_channel import FakeAgent


def make_bundle(tmp_path: Path, readonly: bool = False) -> Bundle:
    (tmp_path / "rootfs").mkdir(parents=True, exist_ok=True)
    spec = {"ociVersion": "1.0.2", "root": {"path": "rootfs", "readonly": readonly},
            "process": {"args": ["true"], "cwd": "/"}, "mounts": []}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    return Bundle(tmp_path, spec)


def config(pool_size: int, enabled: bool = True) -> Config:
    cfg = Config()
    cfg.factory.enabled, cfg.factory.pool_size = enabled, pool_size
    return cfg


@pytest.mark.parametrize(("enabled", "pool_size", "pod"),
                         [(True, 2, True), (True, 0, True), (False, 2, False)])
def test_the_pod_layout_wherever_a_template_can_serve(tmp_path: Path, enabled: bool,
                                                      pool_size: int, pod: bool) -> None:
    b = make_bundle(tmp_path / "b")
    files = layout.Files.of(config(pool_size, enabled), b, tmp_path / "shared", "c1")
    assert files.pod_layout is pod
    shares = files.before_boot()
    if pod:  # one share, empty: a pooled clone's directory is bound on it (or exported)
        assert [(s.tag, s.path) for s in shares] == [(sharedfs.SHARE_TAG, tmp_path / "shared")]
        assert list((tmp_path / "shared").iterdir()) == []
    else:  # the rootfs is a device of its own; nothing staged, no shared device
        assert [(s.tag, s.path) for s in shares] == [(layout.ROOTFS_TAG, b.rootfs)]


def test_rootfs_request_follows_what_was_staged(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b", readonly=True)
    staging = tmp_path / "shared"
    assert layout.rootfs_request(b, staging, "c1") == schema.RootfsShare(
        layout.ROOTFS_TAG, True)
    # A directory the guest could have made there is no mount point: still its own device.
    (staging / "c1" / "rootfs").mkdir(parents=True)
    assert layout.rootfs_request(b, staging, "c1").tag == layout.ROOTFS_TAG


def test_pod_layout_binds_the_rootfs_after_boot(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b", readonly=True)
    (b.rootfs / "file").write_text("x")
    staging = tmp_path / "shared"
    files = layout.Files.of(config(1), b, staging, "c1")
    files.before_boot()
    try:
        files.after_boot()
        assert layout.rootfs_request(b, staging, "c1") == schema.RootfsShare(
            sharedfs.SHARE_TAG, True, "c1/rootfs")
        assert (staging / "c1/rootfs/file").read_text() == "x"
        with pytest.raises(OSError):  # read-only on the host too
            (staging / "c1/rootfs/new").write_text("y")
    finally:
        sharedfs.release(staging)
    assert not staging.exists() and (b.rootfs / "file").exists()


def test_boot_profile_of_a_clone_has_its_restore_phases() -> None:
    # The guest marks are the template's boot: a clone's phases are the host's.
    template_boot = {"python": 0.9, "main": 1.0, "init": 1.1, "loaded": 1.2, "hello": 9.0}
    profile = BootProfile(10.0, 10.0, 10.30, template_boot,
                          (("qemu start", 10.05), ("restore", 10.12)))
    assert [(n, round(s, 3)) for n, s in profile.phases()] == [
        ("qemu start", 0.05), ("restore", 0.07), ("hello", 0.18)]
    leased = BootProfile(10.0, 10.0, 10.03, template_boot, (("lease", 10.02),))
    assert [n for n, _ in leased.phases()] == ["lease", "hello"]


class WarmAgent(FakeAgent):
    """Answers the warm-up's requests as the agent does: start fails (execve refuses the
    empty file), then the exit event comes."""

    def __init__(self, sock: socket.socket, fail: str = "") -> None:
        super().__init__(sock)
        self.methods: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.fail = fail

    async def serve(self) -> None:
        while True:
            frame = await self.frame()
            request = json.loads(frame.payload)
            method = request["method"]
            self.methods.append(method)
            self.requests.append(request)
            if method == self.fail:
                self.error(request["id"], "failed on purpose")
            elif method == schema.Method.START_CONTAINER:
                self.error(request["id"], 'exec: "/warmup": exec format error')
                self.send(Frame(Kind.EVENT, 0, schema.encode({
                    "event": "process_exit", "container_id": warmup.NAME, "exec_id": "",
                    "status": 126})))
            else:
                self.reply(request["id"], {})
                if method == schema.Method.DELETE_CONTAINER:
                    return

    def error(self, rid: int, message: str) -> None:
        self.send(Frame(Kind.RESPONSE, 0, schema.encode(
            {"id": rid, "error": {"kind": "failed", "message": message}})))


async def test_warm_up_runs_a_container_and_leaves_the_channel(tmp_path: Path) -> None:
    host, guest = socket.socketpair()
    agent = WarmAgent(guest)
    await agent.open()
    served = asyncio.create_task(agent.serve())
    took = await warmup.warm_up(host, tmp_path, "slot1", timeout=10)
    await served
    assert took > 0
    assert agent.methods == ["hello", "create_container", "start_container",
                             "delete_container"]
    hello, create = agent.requests[0]["params"], agent.requests[1]["params"]
    assert len(bytes.fromhex(hello["entropy"])) == 32 and hello["time_ns"] > 0
    assert create["rootfs"] == {"tag": sharedfs.SHARE_TAG, "readonly": False,
                                "path": f"{warmup.NAME}/rootfs"}
    assert create["spec"]["process"]["args"] == [warmup.PROGRAM]
    assert all(create["stdio"][k] is None for k in ("stdin", "stdout", "stderr"))
    assert list(tmp_path.iterdir()) == []  # the throw-away rootfs is gone
    # The socket is the lessee's now: still open, nothing of it read or written.
    host.setblocking(False)
    with pytest.raises(BlockingIOError):
        host.recv(1)
    agent.reply(99, {})
    await agent.writer.drain()
    await asyncio.sleep(0.05)
    assert host.recv(4096)
    host.close()
    agent.writer.close()


async def test_a_failed_warm_up_names_the_clone(tmp_path: Path) -> None:
    host, guest = socket.socketpair()
    agent = WarmAgent(guest, fail=schema.Method.CREATE_CONTAINER)
    await agent.open()
    served = asyncio.create_task(agent.serve())
    with pytest.raises(HullError, match="failed on purpose"):
        await warmup.warm_up(host, tmp_path, "slot2", timeout=10)
    served.cancel()
    assert list(tmp_path.iterdir()) == []
    assert host.fileno() >= 0  # not closed: the pool discards the clone, and it
    host.close()
    agent.writer.close()
