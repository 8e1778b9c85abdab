"""The agent's rootfs from a subdirectory of a share (RootfsShare.path): a pod's
containers all live in one 9p share, each under <cid>/rootfs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hull.agentapi import schema
from tests.agent_harness import Agent, make_rootfs, spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent needs root")


@pytest.fixture
def pod_agent(tmp_path: Path) -> Iterator[tuple[Agent, Path]]:
    shares = tmp_path / "shares"
    for cid in ("c1", "c2"):
        make_rootfs(shares / "pod" / cid / "rootfs")
    agent = Agent(tmp_path, shares)
    try:
        agent.hello()
        yield agent, shares / "pod"
    finally:
        status = agent.stop()
    assert status == 0, f"agent exited with {status}; log:\n{agent.log()}"


def create(agent: Agent, cid: str, args: list[str], path: str, *, readonly: bool = False,
           out: int = 1) -> schema.Response:
    stdio = {"stdout": out, "stderr": out + 1}
    agent.open_streams((cid, ""), stdio)
    return agent.call("create_container", {
        "container_id": cid, "spec": spec(args),
        "rootfs": {"tag": "pod", "readonly": readonly, "path": path}, "stdio": stdio})


def test_containers_get_their_own_subdirectory_of_one_share(
        pod_agent: tuple[Agent, Path]) -> None:
    agent, pod = pod_agent
    response = create(agent, "c1", ["sh", "-c", "echo one > /mark"], "c1/rootfs")
    assert response.error_kind is None, response.error_message
    response = create(agent, "c2", ["sh", "-c", "touch /mark || echo refused"], "c2/rootfs",
                      readonly=True, out=3)
    assert response.error_kind is None, response.error_message
    for cid in ("c1", "c2"):
        agent.ok("start_container", {"container_id": cid})
    assert agent.wait_exit("c1").status == 0
    assert agent.wait_exit("c2").status == 0
    assert (pod / "c1/rootfs/mark").read_text() == "one\n"
    assert not (pod / "c2/rootfs/mark").exists()
    assert b"refused" in agent.output(3)


@pytest.mark.parametrize("path", ["../escape", "/abs/rootfs", "c1/../../x"])
def test_paths_leaving_the_share_are_refused(pod_agent: tuple[Agent, Path], path: str
                                             ) -> None:
    agent, _ = pod_agent
    response = create(agent, "bad", ["true"], path)
    assert response.error_kind is schema.ErrorKind.INVALID, response


def test_symlink_out_of_the_share_is_refused(pod_agent: tuple[Agent, Path]) -> None:
    agent, pod = pod_agent
    (pod / "link").symlink_to("/")
    response = create(agent, "bad", ["true"], "link")
    assert response.error_kind is schema.ErrorKind.FAILED
    assert "leaves the share" in response.error_message


def test_schema_bounds_the_path() -> None:
    ok = schema.RootfsShare.from_json({"tag": "t", "path": "a/b"})
    assert ok.path == "a/b" and schema.RootfsShare.from_json({"tag": "t"}).path == ""
    with pytest.raises(schema.SchemaError):
        schema.RootfsShare.from_json({"tag": "t", "path": "x" * 5000})
    with pytest.raises(schema.SchemaError):
        schema.RootfsShare.from_json({"tag": "t", "path": "a\0b"})
