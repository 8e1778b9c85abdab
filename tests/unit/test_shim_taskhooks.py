"""The shim v2's OCI hooks of a task (hull.shim.v2.taskhooks), run on this host."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from hull.errors import HullError
from hull.runtime import hooks
from hull.shim.v2.taskhooks import GUEST_TIMEOUT, TaskHooks


def recorder(out: Path, kind: str) -> dict[str, Any]:
    """A hook that appends its kind and the state it got on stdin to out."""
    return {"path": "/bin/sh", "args": ["sh", "-c", f'echo "$0 $(cat)" >> {out}', kind]}


def task(spec_hooks: dict[str, Any]) -> TaskHooks:
    spec = {"ociVersion": "1.0.2", "annotations": {"a": "b"}, "hooks": spec_hooks}
    return TaskHooks("t1", Path("/run/bundle/t1"), spec, 4242)


async def test_host_hooks_get_the_task_state_in_order(tmp_path: Path) -> None:
    out = tmp_path / "log"
    t = task({kind: [recorder(out, kind)] for kind in
              ("createRuntime", "prestart", "poststart", "poststop")})
    await t.before_create()
    await t.after("poststart", "running")
    await t.after("poststop", "stopped")
    lines = [line.split(" ", 1) for line in out.read_text().splitlines()]
    assert [kind for kind, _ in lines] == ["prestart", "createRuntime", "poststart",
                                           "poststop"]
    states = [json.loads(state) for _, state in lines]
    assert [s["status"] for s in states] == ["creating", "creating", "running", "stopped"]
    assert states[0] == {"ociVersion": "1.0.2", "id": "t1", "status": "creating",
                         "pid": 4242, "bundle": "/run/bundle/t1", "annotations": {"a": "b"}}


async def test_failing_create_hook_names_task_and_hook(tmp_path: Path) -> None:
    out = tmp_path / "log"
    t = task({"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "echo nope >&2; exit 2"]}],
              "createRuntime": [recorder(out, "createRuntime")]})
    with pytest.raises(HullError) as err:
        await t.before_create()
    assert str(err.value) == ("container t1: prestart hook #0 (/bin/sh) failed: "
                              "exit status 2: nope")
    assert not out.exists()


async def test_failing_poststop_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    t = task({"poststop": [{"path": "/bin/false"}]})
    with caplog.at_level(logging.WARNING, "hull.hooks"):
        await t.after("poststop", "stopped")
    assert "poststop hook #0 (/bin/false) failed: exit status 1" in caplog.text


def test_guest_hooks_and_their_time() -> None:
    guest = {"path": "/bin/true", "timeout": 7}
    t = task({"createContainer": [guest, guest], "startContainer": [{"path": "/bin/true"}]})
    handed = t.guest()
    assert handed.state["id"] == "t1" and handed.state["pid"] == 4242
    assert [h.path for h in handed.create_container] == ["/bin/true", "/bin/true"]
    assert t.create_timeout() == GUEST_TIMEOUT + 14
    assert t.start_timeout() == GUEST_TIMEOUT + hooks.UNTIMED_HOOK_WAIT
    assert task({}).create_timeout() == task({}).start_timeout() == GUEST_TIMEOUT
