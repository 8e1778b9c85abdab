"""Automatic template builds: a sandbox that finds no usable template for its key (none
yet, a stale or corrupt one, one that did not restore) boots cold with a notice and asks
for that template to be built in the background (factory.auto_rebuild).

One builder per key at a time, and never a storm of them: the request takes an exclusive
flock on ``<template_dir>/.key-<id>.toml`` and hands that descriptor to a detached
``hull factory init --lock-fd N``, which holds the lock until it is done; a request that
finds the lock taken does nothing. The same file holds the requester's effective
configuration (its size, any annotation overrides), so the builder makes the key that
missed. A failed build leaves ``.key-<id>.failed`` with its error: no new attempt for
RETRY_AFTER seconds, so a broken image does not cost every create a second boot. The
builder is bounded (factory.build_timeout) and owns its template VM like any sandbox;
``hull factory destroy`` stops running builders (``.key-<id>.pid``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from hull.config.settings import Config
from hull.runtime import factory

log = logging.getLogger("hull.factory")
#: Seconds after a failed build before a sandbox may ask for the same key again.
RETRY_AFTER = 600.0


def _files(config: Config, key_id: str) -> tuple[Path, Path, Path]:
    """(request + lock, builder pid, failure record) of one key."""
    base = factory.root(config) / f".key-{key_id}"
    return base.with_suffix(".toml"), base.with_suffix(".pid"), base.with_suffix(".failed")


def config_toml(config: Config) -> str:
    """``config`` as configuration.toml text. Every value is a string, number, boolean or
    list of strings, whose JSON form is also TOML's."""
    lines = []
    for section, table in config.as_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def request(config: Config, key_id: str, why: str) -> str:
    """Start a background build of the template ``key_id`` for ``config`` (the sandbox's
    effective configuration) unless one runs or failed lately. Returns what happened, for
    the sandbox's notice."""
    lock_path, _, failed = _files(config, key_id)
    try:
        age = time.time() - failed.stat().st_mtime
    except FileNotFoundError:
        age = RETRY_AFTER
    if age < RETRY_AFTER:
        return (f"a build of it failed {age:.0f}s ago ({failed}), next attempt in "
                f"{RETRY_AFTER - age:.0f}s")
    try:
        if not start_detached(config, lock_path, "init"):
            return "it is being built"
    except OSError as exc:
        return f"cannot start a build ({exc})"
    log.debug("template %s: build started (%s)", key_id, why)
    return "it is being built in the background"


def start_detached(config: Config, lock_path: Path, action: str) -> bool:
    """Start ``hull factory <action> --lock-fd N``, detached, holding an exclusive flock
    on ``lock_path`` (which gets ``config``, the child's configuration file) for its
    whole life; False, and nothing started, when another process holds that lock."""
    factory.root(config).mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, config_toml(config).encode(), 0)
        argv = [sys.executable, "-m", "hull", "--config", str(lock_path), "factory", action,
                "--lock-fd", str(fd)]
        with open(lock_path.with_suffix(".log"), "wb") as out:
            subprocess.Popen(argv, pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=out,
                             stderr=out, start_new_session=True)
    finally:
        os.close(fd)  # the child holds the lock now
    return True


@contextlib.contextmanager
def builder(config: Config, key_id: str, lock_fd: int) -> Iterator[None]:
    """The builder's side: records its pid for `hull factory destroy`, and the failure
    (if any) for the next request; releases the lock at the end."""
    _, pid_file, failed = _files(config, key_id)
    pid_file.write_text(str(os.getpid()))
    try:
        yield
    except BaseException as exc:
        failed.write_text(f"{type(exc).__name__}: {exc}\n")
        raise
    else:
        failed.unlink(missing_ok=True)
    finally:
        pid_file.unlink(missing_ok=True)
        os.close(lock_fd)


def stop_builders(config: Config, timeout: float = 10.0) -> int:
    """SIGTERM every running builder and wait for their locks; how many there were."""
    base = factory.root(config)
    stopped = 0
    for pid_file in base.glob(".key-*.pid") if base.is_dir() else ():
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"factory" not in cmdline:
            continue  # the builder is gone and its pid was reused
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            stopped += 1
        lock = pid_file.with_suffix(".toml")
        with contextlib.suppress(OSError):
            _wait_lock(lock, timeout)
    return stopped


def _wait_lock(path: Path, timeout: float) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"template builder of {path} did not stop") from None
                time.sleep(0.05)
    finally:
        os.close(fd)
