"""OCI hooks (runtime-spec config.md "POSIX-platform Hooks").

prestart, createRuntime, poststart and poststop run in the runtime namespace: here, on
the host. Each gets the container's state JSON on stdin. A failing prestart/createRuntime
hook fails create; poststart/poststop failures are logged and ignored, as the spec says.

createContainer and startContainer run in the container's namespaces, which live in the
guest: the agent runs them (hull.agent.hooks), with paths in the container's filesystem.
The host hands them over in create_container (:func:`guest_hooks`). To keep the spec's
order (createRuntime before createContainer), the host's create hooks run before the
create_container request is sent.
"""

from __future__ import annotations

import json
import logging
import subprocess
from typing import Any

from hull.agentapi import schema
from hull.errors import HullError

log = logging.getLogger("hull.hooks")
#: The host's create hooks: run before create_container, and their failure fails create.
FATAL = ("prestart", "createRuntime")
#: Extra seconds a create or start request waits per guest hook that has no timeout.
UNTIMED_HOOK_WAIT = 60.0


def guest_hooks(spec: dict[str, Any], state: dict[str, Any]) -> schema.GuestHooks:
    """The createContainer / startContainer hooks of spec, for the agent to run."""
    found = spec.get("hooks") or {}

    def of(kind: str) -> list[schema.Hook]:
        try:
            return [schema.Hook.from_json(h) for h in found.get(kind) or []]
        except schema.SchemaError as exc:
            raise HullError(f"container {state.get('id', '?')}: hooks.{kind}: {exc}") from None

    return schema.GuestHooks(state, of("createContainer"), of("startContainer"))


def guest_wait(hooks: list[schema.Hook]) -> float:
    """How much longer a request may take because the guest runs these hooks."""
    return sum(UNTIMED_HOOK_WAIT if h.timeout is None else float(h.timeout) for h in hooks)


def run_before_create(spec: dict[str, Any], state: dict[str, Any]) -> None:
    """prestart and createRuntime; state's status is "creating", as runc gives it."""
    for kind in FATAL:
        run(spec, kind, {**state, "status": "creating"})


def run(spec: dict[str, Any], kind: str, state: dict[str, Any]) -> None:
    """Run the spec's hooks of one host kind (never createContainer/startContainer)."""
    for i, hook in enumerate((spec.get("hooks") or {}).get(kind) or []):
        try:
            _run_one(hook, state)
        except HullError as exc:
            message = f"{kind} hook #{i} ({hook['path']}) failed: {exc}"
            if kind in FATAL:
                raise HullError(message) from exc
            log.warning("%s", message)


def _run_one(hook: dict[str, Any], state: dict[str, Any]) -> None:
    args = hook.get("args") or [hook["path"]]
    env = dict(item.split("=", 1) for item in hook.get("env") or [] if "=" in item)
    timeout = hook.get("timeout")
    try:
        done = subprocess.run(args, executable=hook["path"], input=json.dumps(state).encode(),
                              env=env, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise HullError(f"timed out after {timeout}s") from None
    except OSError as exc:
        raise HullError(exc.strerror or str(exc)) from exc
    if done.returncode != 0:
        raise HullError(schema.hook_failure(done.returncode, done.stderr))
