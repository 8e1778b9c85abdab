"""OCI hooks run on the host (runtime-spec config.md "POSIX-platform Hooks").

Each hook gets the container's state JSON on stdin. A failing prestart/createRuntime
hook fails the operation; poststart/poststop failures are logged and ignored, as the
spec says. createContainer/startContainer hooks would run in the container's namespaces,
which live in the guest: Hull runs them on the host too, with a warning, since their
binaries are host paths (runc resolves them on the host as well).
"""

from __future__ import annotations

import json
import logging
import subprocess
from typing import Any

from hull.errors import HullError

log = logging.getLogger("hull.hooks")
FATAL = ("prestart", "createRuntime", "createContainer", "startContainer")


def run(spec: dict[str, Any], kind: str, state: dict[str, Any]) -> None:
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
        err = done.stderr.decode(errors="replace").strip().splitlines()
        raise HullError(f"exit status {done.returncode}" + (f": {err[-1]}" if err else ""))
