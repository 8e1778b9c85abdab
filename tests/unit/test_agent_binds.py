"""The agent's side of host bind mounts: sources the host staged in a share
(``hullshare:<tag>/<path>``, hull.runtime.sharedfs) are bound from the share's mount."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hull.agentapi import schema
from tests.agent_harness import Agent, make_rootfs, spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent needs root")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[Agent, Path]]:
    shares = tmp_path / "shares"
    make_rootfs(shares / "rootfs")
    staged = shares / "hullshared" / "c1" / "mounts"
    (staged / "6").mkdir(parents=True)
    (staged / "6" / "old").write_text("from the host\n")
    (staged / "7").mkdir()
    (staged / "7" / "file").write_text("read only\n")
    (staged / "8").write_text("127.0.0.1 staged\n")
    agent = Agent(tmp_path, shares)
    try:
        agent.hello()
        yield agent, staged
    finally:
        status = agent.stop()
    assert status == 0, f"agent exited with {status}; log:\n{agent.log()}"


def bind(dest: str, index: int, *options: str) -> dict[str, Any]:
    return {"destination": dest, "type": "bind", "options": list(options),
            "source": f"{schema.SHARE_SOURCE_PREFIX}hullshared/c1/mounts/{index}"}


def create(agent: Agent, args: list[str], mounts: list[dict[str, Any]]) -> schema.Response:
    config = spec(args)
    config["mounts"] += mounts  # the default mounts are indexes 0-6... of the share's 6-8
    stdio = {"stdout": 1, "stderr": 2}
    agent.open_streams(("c1", ""), stdio)
    return agent.call("create_container", {
        "container_id": "c1", "spec": config, "rootfs": {"tag": "rootfs"}, "stdio": stdio})


def test_staged_binds_rw_ro_and_file(agent: tuple[Agent, Path]) -> None:
    a, staged = agent
    script = ("cat /data/old; echo new > /data/new; cat /ro/file; "
              "touch /ro/x 2>/dev/null && echo wrote || echo refused; cat /etc/hosts")
    response = create(a, ["sh", "-c", script], [
        bind("/data", 6, "rbind", "rw"), bind("/ro", 7, "rbind", "ro"),
        bind("/etc/hosts", 8, "bind", "ro")])
    assert response.error_kind is None, response.error_message
    a.ok("start_container", {"container_id": "c1"})
    assert a.wait_exit("c1").status == 0, a.output(2)
    assert a.output(1) == b"from the host\nread only\nrefused\n127.0.0.1 staged\n"
    assert (staged / "6" / "new").read_text() == "new\n"
    assert not (staged / "7" / "x").exists()


@pytest.mark.parametrize("path", ["c1/../../etc", "/c1/mounts/6", "c1//mounts/6", "", "c1/./x"])
def test_share_paths_leaving_the_share_are_refused(agent: tuple[Agent, Path], path: str
                                                   ) -> None:
    a, _ = agent
    mount = {"destination": "/data", "type": "bind",
             "source": f"{schema.SHARE_SOURCE_PREFIX}hullshared/{path}"}
    response = create(a, ["true"], [mount])
    assert response.error_kind is schema.ErrorKind.FAILED, response
    assert "mount /data" in response.error_message


def test_symlink_out_of_the_share_is_refused(agent: tuple[Agent, Path]) -> None:
    a, staged = agent
    (staged / "9").symlink_to("/etc")
    response = create(a, ["true"], [bind("/data", 9)])
    assert response.error_kind is schema.ErrorKind.FAILED, response
    assert "leaves the share" in response.error_message


def test_missing_staged_source_fails_naming_the_mount(agent: tuple[Agent, Path]) -> None:
    a, _ = agent
    response = create(a, ["true"], [bind("/data", 42)])
    assert response.error_kind is schema.ErrorKind.FAILED, response
    assert "mount /data" in response.error_message
