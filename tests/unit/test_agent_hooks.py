"""createContainer and startContainer hooks, run by the agent in the container's
namespaces with the container's filesystem (hull.agent.hooks); the agent runs on the host
in test mode (tests/agent_harness.py). tests/integration/test_cli.py proves it in a VM."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hull.agentapi import schema
from tests.agent_harness import SHARE_TAG, Agent, running_agent, share_with_rootfs, spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent needs root")

STATE = {"ociVersion": "1.0.2", "id": "from-host", "bundle": "/b", "annotations": {"k": "v"}}


@pytest.fixture(scope="module")
def share_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return share_with_rootfs(tmp_path_factory.mktemp("shares"))


@pytest.fixture
def agent(tmp_path: Path, share_dir: Path) -> Iterator[Agent]:
    with running_agent(tmp_path, share_dir) as agent:
        yield agent


def sh(script: str, **extra: Any) -> dict[str, Any]:
    return {"path": "/bin/sh", "args": ["sh", "-c", script], **extra}


def create(agent: Agent, cid: str, args: list[str], *,
           create_hooks: list[dict[str, Any]] | None = None,
           start_hooks: list[dict[str, Any]] | None = None) -> schema.Response:
    stdio: dict[str, int | None] = {"stdout": 1, "stderr": 2}
    agent.open_streams((cid, ""), stdio)
    return agent.call("create_container", {
        "container_id": cid, "spec": spec(args), "rootfs": {"tag": SHARE_TAG},
        "stdio": stdio, "hooks": {"state": STATE, "create_container": create_hooks or [],
                                  "start_container": start_hooks or []}})


def test_create_hook_runs_in_the_containers_namespaces_and_root(agent: Agent, share_dir: Path
                                                        ) -> None:
    rootfs = share_dir / "rootfs"
    # chrooted into the rootfs (/bin/sh is the rootfs's busybox), in the container's
    # uts and pid namespaces, with the spec's mounts in place, its env only, state on stdin
    hook = sh("cat > /tmp/c-state; hostname > /tmp/c-host; ls /proc/1 > /dev/null && "
              "echo ok > /tmp/c-proc; echo \"$FOO:${PYTEST_CURRENT_TEST-unset}\" > /tmp/c-env",
              env=["FOO=bar"])
    response = create(agent, "c", ["cat", "/tmp/c-host"], create_hooks=[hook])
    assert response.error_kind is None, response.error_message
    state = json.loads((rootfs / "tmp/c-state").read_text())
    assert state == {**STATE, "pid": 1, "status": "creating"}
    assert (rootfs / "tmp/c-host").read_text() == "box\n"
    assert (rootfs / "tmp/c-proc").read_text() == "ok\n"
    # only its own env (the agent here has pytest's PYTEST_CURRENT_TEST)
    assert (rootfs / "tmp/c-env").read_text() == "bar:unset\n"
    agent.ok("start_container", {"container_id": "c"})
    assert agent.wait_exit("c").status == 0
    assert agent.output(1) == b"box\n"


def test_start_hooks_run_in_order_before_the_process(agent: Agent, share_dir: Path) -> None:
    hooks = [sh("read -r state; echo \"1 $state\" >> /tmp/s-log"),
             sh("echo 2 >> /tmp/s-log")]
    response = create(agent, "s", ["cat", "/tmp/s-log"], start_hooks=hooks)
    assert response.error_kind is None, response.error_message
    assert not (share_dir / "rootfs/tmp/s-log").exists()  # not before start
    agent.ok("start_container", {"container_id": "s"})
    assert agent.wait_exit("s").status == 0
    first, second = agent.output(1).decode().splitlines()
    assert json.loads(first[2:]) == {**STATE, "pid": 1, "status": "created"}
    assert second == "2"


def test_failing_create_hook_fails_create_and_frees_the_id(agent: Agent) -> None:
    hooks = [sh("true"), sh("echo noise; echo 'it broke' >&2; exit 3")]
    response = create(agent, "f", ["true"], create_hooks=hooks)
    assert response.error_kind == schema.ErrorKind.FAILED
    assert response.error_message == ("container f: createContainer hook #1 (/bin/sh) "
                                      "failed: exit status 3: it broke")
    assert agent.call("start_container", {"container_id": "f"}).error_kind == \
        schema.ErrorKind.NOT_FOUND
    assert create(agent, "f", ["true"]).error_kind is None


def test_failing_start_hook_fails_start_and_the_process_never_runs(agent: Agent,
                                                                   share_dir: Path) -> None:
    response = create(agent, "g", ["touch", "/tmp/g-ran"],
                      start_hooks=[{"path": "/bin/no-such-hook"}])
    assert response.error_kind is None, response.error_message
    failed = agent.call("start_container", {"container_id": "g"})
    assert failed.error_kind == schema.ErrorKind.FAILED
    assert failed.error_message == ("container g: startContainer hook #0 (/bin/no-such-hook) "
                                    "failed: exit status 127: /bin/no-such-hook: no such file "
                                    "or directory")
    assert agent.wait_exit("g").status != 0
    assert not (share_dir / "rootfs/tmp/g-ran").exists()


def test_hook_timeout_kills_it(agent: Agent) -> None:
    began = time.monotonic()
    response = create(agent, "t", ["true"], create_hooks=[sh("sleep 30", timeout=1)])
    assert time.monotonic() - began < 10
    assert response.error_kind == schema.ErrorKind.FAILED
    assert response.error_message.endswith("createContainer hook #0 (/bin/sh) failed: "
                                           "timed out after 1s")


def test_hooks_schema_refuses_bad_hooks() -> None:
    for bad, why in (({"path": "sh"}, "absolute"), ({"path": "/x", "timeout": 0}, "timeout"),
                     ({"path": "/x", "args": "a"}, "args")):
        with pytest.raises(schema.SchemaError, match=why):
            schema.GuestHooks.from_json({"create_container": [bad]})
    hooks = schema.GuestHooks({"id": "x"}, [schema.Hook("/a", ["a", "1"], ["A=1"], 5)])
    assert schema.GuestHooks.from_json(schema.params(hooks)) == hooks
