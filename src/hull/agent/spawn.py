"""Forking a container's init process and its exec processes.

Why two forks for the init (runc does the same): CLONE_NEWPID applies to the children of
the caller only. Helper A unshares the new namespaces and forks B, which is PID 1 of the
new pid namespace; A reports B's pid and exits, so B is reparented to the agent (guest
PID 1, or a subreaper in test mode).

An exec takes one fork (a helper C that joined the namespaces and forked D cost ~7 ms
under TCG): the agent itself points its pid_for_children at the init's pid namespace
(setns(2) with CLONE_NEWPID changes only where its children go), forks D there and
points it back. D, the agent's own child (no reparenting, no "P" line), joins the
container's cgroup and its other namespaces with setns(2) before it sets up the process.

The children talk to the agent through a status pipe, one line per message:

    P<pid>     A: the pid of B (always the first line: B waits until A exited)
    W<text>    a warning for the agent's log
    T<fd>      the pty master B/D opened in the container; the agent takes it (pidfd_getfd)
    R          B is ready and blocks before execve until the agent writes the start pipe
    E<text>    setup or execve failed; the child exits (127: not found, 126: other)

The pipe is close-on-exec, so EOF after R (for an exec: at all) means execve worked.
Child code never returns into the agent: every path ends in execve or os._exit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable

from hull.agent import caps, hooks, rootfs
from hull.agent import syscalls as sc
from hull.agent.loop import reset_child_signals
from hull.agent.seccomp import Filter
from hull.agent.spec import DEFAULT_PATH, ContainerSpec, IdMap, ProcessSpec
from hull.agentapi.schema import GuestHooks

TYPE_CHECKING = False  # not typing's: the agent must not import typing (agentapi/records.py)
if TYPE_CHECKING:
    from typing import NoReturn

# setns order for an exec: the user namespace first (it owns the others), the mount
# namespace last, as it changes root and cwd (and so where /proc/<pid>/ns is found).
_JOIN = (("user", sc.CLONE_NEWUSER), ("ipc", sc.CLONE_NEWIPC), ("uts", sc.CLONE_NEWUTS),
         ("net", sc.CLONE_NEWNET), ("cgroup", sc.CLONE_NEWCGROUP), ("pid", sc.CLONE_NEWPID),
         ("mnt", sc.CLONE_NEWNS))
# spec namespace type -> (unshare flag, /proc/PID/ns name)
NS_FLAGS = {"pid": (sc.CLONE_NEWPID, "pid"), "network": (sc.CLONE_NEWNET, "net"),
            "mount": (sc.CLONE_NEWNS, "mnt"), "ipc": (sc.CLONE_NEWIPC, "ipc"),
            "uts": (sc.CLONE_NEWUTS, "uts"), "cgroup": (sc.CLONE_NEWCGROUP, "cgroup")}
_MAX_MESSAGE = 2000
_TIOCGPTN = 0x80045430


class Stdio:
    """The child's ends of its stdio pipes; None means /dev/null (all None with a pty)."""

    __slots__ = ("stderr", "stdin", "stdout")

    def __init__(self, stdin: int | None = None, stdout: int | None = None,
                 stderr: int | None = None) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr


class Setup:
    """What the agent decided for a new process beyond its spec."""

    __slots__ = ("cgroup_procs", "hooks", "join", "seccomp")

    def __init__(self, cgroup_procs: str | None = None, join: dict[str, int] | None = None,
                 seccomp: Filter | None = None, hooks: GuestHooks | None = None) -> None:
        #: the container cgroup's cgroup.procs: the helper moves itself there first
        self.cgroup_procs = cgroup_procs
        #: spec namespace type -> an fd of the namespace to join (opened by the agent)
        self.join = join or {}
        #: the container's seccomp filter (an exec gets the container's)
        self.seccomp = seccomp
        #: the init's createContainer and startContainer hooks (hull.agent.hooks)
        self.hooks = hooks or GuestHooks()


class Spawned:
    """The agent's handles on a forked child: the init's helper A, or an exec itself."""

    __slots__ = ("pid", "start_fd", "status_fd")

    def __init__(self, pid: int, status_fd: int, start_fd: int | None) -> None:
        #: the init's helper A (it reports the init's pid), or the exec process D
        self.pid = pid
        self.status_fd = status_fd  # read end of the status pipe, non-blocking
        #: write end of the pipe the child waits on: start (init), terminal taken (exec)
        self.start_fd = start_fd


class ExecError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------- agent side


def spawn_init(cid: str, root: str, cspec: ContainerSpec, stdio: Stdio, devnull: int, *,
               no_pivot: bool = False, setup: Setup | None = None) -> Spawned:
    """Fork the container init (blocked before execve); the agent keeps the pipes' ends."""
    caps.last_cap()  # read once, in the agent: not again in every child
    status_r, status_w = os.pipe()
    start_r, start_w = os.pipe()
    sync_r, sync_w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        for fd in (status_r, status_w, start_r, start_w, sync_r, sync_w):
            os.close(fd)
        raise
    if pid == 0:
        _child(status_w, lambda: _init_helper(cid, root, cspec, stdio, devnull, status_w,
                                              start_r, sync_r, no_pivot, setup or Setup()))
    for fd in (status_w, start_r, sync_r, sync_w):
        os.close(fd)
    os.set_blocking(status_r, False)
    return Spawned(pid, status_r, start_w)


def spawn_exec(init_pid: int, pspec: ProcessSpec, stdio: Stdio, devnull: int,
               setup: Setup | None = None) -> Spawned:
    """Fork a process into the namespaces of the container whose init is init_pid.

    With a terminal, the child waits after its T line until the agent writes (or closes)
    ``start_fd``: execve would close the master before the agent took it over.
    """
    caps.last_cap()  # read once, in the agent: not again in every child
    joins = _namespaces_to_join(init_pid)
    pipes: list[int] = []
    try:
        status_r, status_w = os.pipe()
        pipes += (status_r, status_w)
        ack_r, ack_w = os.pipe() if pspec.terminal else (-1, -1)
        pipes += [fd for fd in (ack_r, ack_w) if fd >= 0]
        pid = _fork_in_pidns(next((fd for fd, nstype in joins if nstype == sc.CLONE_NEWPID),
                                  None))
    except OSError:
        for fd in (*pipes, *(fd for fd, _ in joins)):
            os.close(fd)
        raise
    if pid == 0:
        _child(status_w, lambda: _exec_process(pspec, stdio, devnull, status_w, ack_r,
                                               setup or Setup(), joins))
    for fd in (status_w, ack_r, *(fd for fd, _ in joins)):
        if fd >= 0:
            os.close(fd)
    os.set_blocking(status_r, False)
    return Spawned(pid, status_r, ack_w if ack_w >= 0 else None)


def _namespaces_to_join(init_pid: int) -> list[tuple[int, int]]:
    """(fd, nstype) of the init's namespaces that are not the agent's, in _JOIN order."""
    fds: list[tuple[int, int]] = []
    try:
        for name, nstype in _JOIN:
            path = f"/proc/{init_pid}/ns/{name}"
            try:
                if os.readlink(path) == os.readlink(f"/proc/self/ns/{name}"):
                    continue  # the same (joining one's own user namespace is EINVAL)
                fds.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), nstype))
            except FileNotFoundError:
                if name != "cgroup":
                    raise
    except OSError:
        for fd, _ in fds:
            os.close(fd)
        raise
    return fds


def _fork_in_pidns(pidns: int | None) -> int:
    """os.fork(), the child in pid namespace ``pidns`` (None: the agent's own).

    setns(CLONE_NEWPID) moves only the caller's pid_for_children, never the caller: the
    agent goes back to its own right after the fork (allowed: it is its active one).
    """
    if pidns is None:
        return os.fork()
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    pid = -1
    try:
        sc.setns(pidns, sc.CLONE_NEWPID)
        try:
            pid = os.fork()
        finally:
            if pid != 0:  # the agent goes back (the child is where it belongs: stays)
                sc.setns(own, sc.CLONE_NEWPID)
    finally:
        if pid != 0:  # the child's copy is close-on-exec and closed with its other fds
            os.close(own)
    return pid


# ---------------------------------------------------------------------------- child side


class _Status:
    """The child's end of the status pipe (its fd number changes when fds are arranged)."""

    fd = -1

    @classmethod
    def send(cls, kind: str, text: str = "") -> None:
        line = (kind + text.replace("\n", " ")[:_MAX_MESSAGE] + "\n").encode(errors="replace")
        with contextlib.suppress(OSError):
            os.write(cls.fd, line)


def _child(status_fd: int, body: Callable[[], None]) -> NoReturn:
    """Run body in a forked child; whatever happens, never return into the agent."""
    code = 1
    _Status.fd = status_fd
    try:
        reset_child_signals()
        body()
        code = 0
    except ExecError as exc:
        _Status.send("E", str(exc))
        code = exc.code
    except BaseException as exc:
        _Status.send("E", rootfs.os_text(exc))
    os._exit(code)


def _init_helper(cid: str, root: str, cspec: ContainerSpec, stdio: Stdio, devnull: int,
                 status_w: int, start_r: int, sync_r: int, no_pivot: bool,
                 setup: Setup) -> None:
    """Helper A: cgroup, joined and new namespaces, fork B, report B's pid, exit.

    A holds the write end of the sync pipe (inherited); its exit is B's signal to go on.
    Mount, pid, uts, ipc and cgroup namespaces are always new unless the spec names one
    to join (the guest's own must stay the agent's); network and user only when asked.
    """
    if setup.cgroup_procs:
        _join_cgroup(setup.cgroup_procs)
    for kind, fd in setup.join.items():
        sc.setns(fd, NS_FLAGS[kind][0])
    if cspec.namespaces.get("user") == "":
        _new_user_namespace(cspec.uid_mappings, cspec.gid_mappings)
    flags = 0
    for kind, (flag, _) in NS_FLAGS.items():
        if kind in setup.join or (kind == "network" and cspec.namespaces.get(kind) != ""):
            continue
        flags |= flag
    try:
        sc.unshare(flags)
    except OSError as exc:
        if exc.errno != errno.EINVAL or not flags & sc.CLONE_NEWCGROUP:
            raise
        sc.unshare(flags & ~sc.CLONE_NEWCGROUP)  # a kernel without cgroup namespaces
    pid = os.fork()
    if pid == 0:
        _child(status_w, lambda: _init_process(cid, root, cspec, stdio, devnull, status_w,
                                               start_r, sync_r, no_pivot, setup))
    _Status.send("P", str(pid))


def _join_cgroup(procs: str) -> None:
    try:
        _write(procs, "0")
    except OSError as exc:
        raise rootfs.SetupError(f"join cgroup {os.path.dirname(procs)}: "
                                f"{sc.strerror(exc.errno or 0)}") from exc


def _new_user_namespace(uid_maps: tuple[IdMap, ...], gid_maps: tuple[IdMap, ...]) -> None:
    """unshare(CLONE_NEWUSER); a child still outside writes our uid_map and gid_map."""
    ready_r, ready_w = os.pipe()
    me = os.getpid()
    pid = os.fork()
    if pid == 0:  # the mapper: waits for the unshare, writes the maps, exits
        code = 1
        try:
            os.close(ready_w)
            if os.read(ready_r, 1):
                _write_map(f"/proc/{me}/uid_map", uid_maps, "linux.uidMappings")
                _write_map(f"/proc/{me}/gid_map", gid_maps, "linux.gidMappings")
                code = 0
        except rootfs.SetupError as exc:
            _Status.send("E", str(exc))
            code = 2
        finally:
            os._exit(code)
    os.close(ready_r)
    try:
        sc.unshare(sc.CLONE_NEWUSER)
    finally:
        with contextlib.suppress(OSError):
            os.write(ready_w, b"u")
        os.close(ready_w)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 2:
        os._exit(1)  # the mapper sent the error line
    if code != 0:
        raise rootfs.SetupError("user namespace: the id mappings could not be written")
    with contextlib.suppress(OSError):  # root of the new namespace, when 0 is mapped
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)


def _write_map(path: str, maps: tuple[IdMap, ...], what: str) -> None:
    text = "".join(f"{m.container_id} {m.host_id} {m.size}\n" for m in maps)
    try:
        _write(path, text)
    except OSError as exc:
        raise rootfs.SetupError(f"{what} cannot be applied ({text.strip()!r}): "
                                f"{sc.strerror(exc.errno or 0)}") from exc


def _init_process(cid: str, root: str, cspec: ContainerSpec, stdio: Stdio, devnull: int,
                  status_w: int, start_r: int, sync_r: int, no_pivot: bool,
                  setup: Setup) -> None:
    """B: PID 1 of the container; set up, report ready, wait for start, execve."""
    status_w, start_r, sync_r = _arrange_fds(stdio, devnull, (status_w, start_r, sync_r))
    _Status.fd = status_w
    while os.read(sync_r, 1):  # EOF once helper A has exited (its "P" line came first)
        pass
    os.close(sync_r)
    os.setsid()
    proc = cspec.process
    if proc.oom_score_adj is not None:
        _write("/proc/self/oom_score_adj", str(proc.oom_score_adj))
    if cspec.hostname:
        sc.sethostname(cspec.hostname)
    if cspec.domainname:
        sc.setdomainname(cspec.domainname)
    if cspec.namespaces.get("network") == "":
        _loopback_up()
    # runc creates a missing cwd; on a read-only rootfs chdir reports it if it matters.
    with contextlib.suppress(OSError):
        os.makedirs(rootfs.secure_join(root, proc.cwd), 0o755, exist_ok=True)
    state = {**setup.hooks.state, "pid": os.getpid(), "status": "creating"}
    rootfs.prepare(root, cspec, lambda text: _Status.send("W", text), no_pivot=no_pivot,
                   before_pivot=lambda: hooks.run_all(
                       "createContainer", setup.hooks.create_container, state, root))
    if proc.terminal:
        _open_terminal(console=True)
    rootfs.finish(cspec)
    if cspec.personality is not None:
        sc.personality(cspec.personality)
    path = _prepare_process(proc, setup.seccomp)
    _Status.send("R")
    if not os.read(start_r, 1):
        os._exit(0)  # the agent deleted the container before starting it
    os.close(start_r)
    hooks.run_all("startContainer", setup.hooks.start_container,
                  {**state, "status": "created"})
    _execve(path, proc)


def _exec_process(pspec: ProcessSpec, stdio: Stdio, devnull: int, status_w: int,
                  ack_r: int, setup: Setup, joins: list[tuple[int, int]]) -> None:
    """D: join the container's cgroup and namespaces (the pid namespace it was forked
    into), then set up the process (root and cwd: the container's root) and execve."""
    if setup.cgroup_procs:
        _join_cgroup(setup.cgroup_procs)
    for fd, nstype in joins:
        if nstype != sc.CLONE_NEWPID:
            sc.setns(fd, nstype)
    keep = (status_w, ack_r) if ack_r >= 0 else (status_w,)
    status_w, *acks = _arrange_fds(stdio, devnull, keep)
    _Status.fd = status_w
    if pspec.terminal:
        os.setsid()
        _open_terminal(console=False)
        os.read(acks[0], 1)  # the agent has the master now (or gave up on it)
        os.close(acks[0])
    if pspec.oom_score_adj is not None:
        _write("/proc/self/oom_score_adj", str(pspec.oom_score_adj))
    path = _prepare_process(pspec, setup.seccomp, check_path=False)
    _execve(path, pspec)


def _arrange_fds(stdio: Stdio, devnull: int, keep: tuple[int, ...]) -> list[int]:
    """stdio onto 0/1/2, the kept fds (close-on-exec) above them, every other fd closed."""
    sources = [devnull if fd is None else fd for fd in (stdio.stdin, stdio.stdout, stdio.stderr)]
    # Duplicate first: a source or kept fd may itself be 0, 1 or 2.
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in (*sources, *keep)]
    for target, fd in enumerate(moved[:3]):
        os.dup2(fd, target)
    kept = moved[3:]
    low = 3
    for fd in sorted(kept):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(low + 1, os.sysconf("SC_OPEN_MAX")))
    return kept


def _open_terminal(*, console: bool) -> None:
    """A pty of the container's own devpts as the controlling terminal on 0/1/2.

    The master goes to the agent (T line); runc instead sends it over a console socket.
    """
    try:
        master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise rootfs.SetupError(f"terminal: open /dev/ptmx: {sc.strerror(exc.errno or 0)}"
                                ) from exc
    fcntl.ioctl(master, sc.TIOCSPTLCK, struct.pack("i", 0))  # unlockpt
    number = struct.unpack("I", fcntl.ioctl(master, _TIOCGPTN, b"\0" * 4))[0]
    try:
        slave = fcntl.ioctl(master, sc.TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        slave = os.open(f"/dev/pts/{number}", os.O_RDWR | os.O_NOCTTY)
    fcntl.ioctl(slave, sc.TIOCSCTTY, 0)
    for target in (0, 1, 2):
        os.dup2(slave, target)
    os.close(slave)
    if console:
        try:  # runc: the init's terminal is also /dev/console
            if not os.path.lexists("/dev/console"):
                os.close(os.open("/dev/console", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            sc.mount(f"/dev/pts/{number}", "/dev/console", None, sc.MS_BIND)
        except OSError as exc:
            _Status.send("W", f"/dev/console: {rootfs.os_text(exc)}")
    _Status.send("T", str(master))


def _prepare_process(proc: ProcessSpec, seccomp: Filter | None = None, *,
                     check_path: bool = True) -> str:
    """Limits, user, capabilities, cwd and seccomp of the process (runc's order).

    Returns the resolved executable (``check_path``: see resolve). Without
    noNewPrivileges the filter goes in before the capabilities are dropped (installing it
    needs CAP_SYS_ADMIN then), as in runc.
    """
    for label, value in (("apparmorProfile", proc.apparmor_profile),
                         ("selinuxLabel", proc.selinux_label)):
        if value:
            _Status.send("W", f"process.{label} {value!r} ignored: the guest has no LSM")
    for rl in proc.rlimits:
        try:
            sc.setrlimit(rl.resource, rl.soft, rl.hard)
        except OSError as exc:
            raise rootfs.SetupError(f"process.rlimits: {rl.resource}: "
                                    f"{sc.strerror(exc.errno or 0)}") from exc
    if seccomp is not None and not proc.no_new_privileges:
        _install_seccomp(seccomp)
    last = caps.last_cap()
    if proc.capabilities is not None:
        caps.drop_bounding(proc.capabilities, last)
        sc.prctl(sc.PR_SET_KEEPCAPS, 1)
    # Try cwd as root first (it may be below a directory the user cannot search), then
    # again as the user, like runc.
    try:
        os.chdir(proc.cwd)
        cwd_done = True
    except OSError:
        cwd_done = False
    user = proc.user
    os.setgroups(list(user.additional_gids))
    os.setgid(user.gid)
    os.setuid(user.uid)
    os.umask(user.umask)
    if proc.capabilities is not None:
        sc.prctl(sc.PR_SET_KEEPCAPS, 0)
        caps.apply(proc.capabilities, last, lambda text: _Status.send("W", text))
    if proc.no_new_privileges:
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    if not cwd_done:
        try:
            os.chdir(proc.cwd)
        except OSError as exc:
            raise rootfs.SetupError(f"chdir to cwd {proc.cwd}: {sc.strerror(exc.errno or 0)}"
                                    ) from exc
    path = resolve(proc.args[0], proc.getenv("PATH"), check=check_path)
    if seccomp is not None and proc.no_new_privileges:
        _install_seccomp(seccomp)
    return path


def _install_seccomp(seccomp: Filter) -> None:
    try:
        sc.seccomp_filter(seccomp.program, seccomp.flags)
    except OSError as exc:
        raise rootfs.SetupError(f"linux.seccomp: install the filter: "
                                f"{sc.strerror(exc.errno or 0)}") from exc


def _loopback_up() -> None:
    from hull.agent import init

    try:
        init.loopback_up()
    except OSError as exc:
        _Status.send("W", f"network namespace: lo: {sc.strerror(exc.errno or 0)}")


def resolve(name: str, path_env: str | None, *, check: bool = True) -> str:
    """The executable execve will run: name, or the first match on PATH (exec.LookPath).

    ``check=False`` leaves a name with a slash to execve, which fails the same way
    (_execve): an exec's reply waits for its execve anyway, and each stat goes to the
    9p share (~2.5 ms under TCG). The init checks at create time, as runc does.
    """
    if "/" in name:
        problem = _check_executable(name) if check else 0
        if problem:
            raise ExecError(f'exec: "{name}": {sc.strerror(problem)}',
                            127 if problem == errno.ENOENT else 126)
        return name
    denied = False
    for directory in (DEFAULT_PATH if path_env is None else path_env).split(":"):
        candidate = os.path.join(directory or ".", name)
        problem = _check_executable(candidate)
        if not problem:
            return candidate
        denied = denied or problem == errno.EACCES
    if denied:
        raise ExecError(f'exec: "{name}": permission denied', 126)
    raise ExecError(f'exec: "{name}": executable file not found in $PATH', 127)


def _check_executable(path: str) -> int:
    """0 when path is an executable file, else the errno execve would give."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.errno or errno.ENOENT
    if stat.S_ISDIR(st.st_mode) or not os.access(path, os.X_OK):
        return errno.EACCES
    return 0


def _execve(path: str, proc: ProcessSpec) -> NoReturn:
    env: dict[str, str] = {}
    for item in proc.env:
        key, sep, value = item.partition("=")
        if sep and key:
            env[key] = value
    try:
        os.execve(path, list(proc.args), env)
    except OSError as exc:
        code = 127 if exc.errno == errno.ENOENT else 126
        raise ExecError(f'exec: "{proc.args[0]}": {sc.strerror(exc.errno or 0)}', code
                        ) from exc


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


# ---------------------------------------------------------------------------- status pipe


class StatusPipe:
    """The agent's end of a child's status pipe: complete lines, then EOF."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.eof = False
        self._partial = b""
        #: set by the server: reads and handles what is there (also called when reaping)
        self.on_readable: Callable[[], None] = _nothing

    def read(self) -> list[tuple[str, str]]:
        """The (kind, text) messages readable now; sets eof when the last writer is gone."""
        chunks = [self._partial]
        while not self.eof:
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                break
            if data:
                chunks.append(data)
            else:
                self.eof = True
        *lines, self._partial = b"".join(chunks).split(b"\n")
        return [(line[:1].decode(), line[1:].decode(errors="replace")) for line in lines if line]


def _nothing() -> None:
    pass
