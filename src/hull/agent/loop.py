"""A minimal single-threaded event loop: fd readiness (epoll), timers, SIGCHLD.

One fd may have a reader and a writer at once (a pty master carries both directions);
the loop keeps the selector registration equal to the union of the two. Always go through
:meth:`Loop.close` to close a watched fd: an fd closed behind the selector's back leaves a
stale registration that breaks the next fd of the same number.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import select
import signal
import time
from collections.abc import Callable

Callback = Callable[[], None]
# epoll itself, not the selectors module: that import costs ~11 ms in a TCG guest at boot.
_READ = select.EPOLLIN
_WRITE = select.EPOLLOUT


class Timer:
    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callback) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: Timer) -> bool:
        return self.deadline < other.deadline


class Loop:
    def __init__(self) -> None:
        self._sel = select.epoll()
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._timers: list[Timer] = []
        self.running = True
        self._sig_r = -1

    # ------------------------------------------------------------------ fds

    def set_reader(self, fd: int, callback: Callback | None) -> None:
        self._set(self._readers, fd, callback)

    def set_writer(self, fd: int, callback: Callback | None) -> None:
        self._set(self._writers, fd, callback)

    def _set(self, table: dict[int, Callback], fd: int, callback: Callback | None) -> None:
        had = fd in self._readers or fd in self._writers
        if callback is None:
            if table.pop(fd, None) is None:
                return
        else:
            table[fd] = callback
        events = (_READ if fd in self._readers else 0) | (_WRITE if fd in self._writers else 0)
        if not events:
            with contextlib.suppress(OSError):  # as selectors: an fd closed already is gone
                self._sel.unregister(fd)
        elif had:
            self._sel.modify(fd, events)
        else:
            self._sel.register(fd, events)

    def forget(self, fd: int) -> None:
        self.set_reader(fd, None)
        self.set_writer(fd, None)

    def close(self, fd: int) -> None:
        """Stop watching fd and close it."""
        self.forget(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    # ------------------------------------------------------------------ timers

    def call_later(self, delay: float, callback: Callback) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, timer)
        return timer

    # ------------------------------------------------------------------ signals

    def watch_sigchld(self, callback: Callback) -> None:
        """Run callback (in the loop, not in signal context) after every SIGCHLD."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._sig_r = r
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, _ignore_signal)

        def drain() -> None:
            try:
                while os.read(r, 512):
                    pass
            except BlockingIOError:
                pass
            callback()

        self.set_reader(r, drain)

    # ------------------------------------------------------------------ run

    def run_once(self, max_wait: float | None = None) -> None:
        timeout = max_wait
        if self._timers:
            wait = max(0.0, self._timers[0].deadline - time.monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        for fd, ready in self._sel.poll(-1 if timeout is None else timeout):
            # as selectors does: an error or hang-up wakes both the reader and the writer
            events = (_WRITE if ready & ~_READ else 0) | (_READ if ready & ~_WRITE else 0)
            # Check both tables again: an earlier callback of this round may have
            # removed (or closed) this fd.
            if events & _READ and fd in self._readers:
                _guarded(self._readers[fd])
            if events & _WRITE and fd in self._writers:
                _guarded(self._writers[fd])
        now = time.monotonic()
        while self._timers and self._timers[0].deadline <= now:
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                _guarded(timer.callback)

    def run(self) -> None:
        while self.running:
            self.run_once()


def _guarded(callback: Callback) -> None:
    """Run a callback; a bug in one handler must not take PID 1 (and the VM) down."""
    try:
        callback()
    except Exception:
        import traceback

        from hull.agent.log import log

        log(f"internal error:\n{traceback.format_exc()}")


def _ignore_signal(signum: int, frame: object) -> None:
    """A Python-level handler, so the signal reaches the wakeup fd instead of SIG_DFL."""


def reset_child_signals() -> None:
    """In a forked child, before exec: undo what the agent (and Python) did to signals."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM,
                signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
