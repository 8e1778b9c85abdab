"""The part of an OCI runtime-spec config the agent acts on, checked and typed.

Parsing happens in the agent before any fork, so a malformed spec becomes an ``invalid``
error reply instead of a child that dies halfway. The host validated the bundle already;
the checks here only guard the agent against shapes it cannot act on.
"""

from __future__ import annotations

from typing import Any

from hull.agent import syscalls as sc

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MAX_ID = 2**32 - 1


class SpecError(ValueError):
    """The spec (or process) object cannot be acted on; the message names the field."""


# Plain classes, not dataclasses: each @dataclass costs ~0.7 ms to create (exec of
# generated code), ten times that in the guest, at every boot.


class User:
    __slots__ = ("additional_gids", "gid", "uid", "umask")

    def __init__(self, uid: int = 0, gid: int = 0, additional_gids: tuple[int, ...] = (),
                 umask: int = 0o022) -> None:
        self.uid = uid
        self.gid = gid
        self.additional_gids = additional_gids
        self.umask = umask


class Rlimit:
    __slots__ = ("hard", "resource", "soft")

    def __init__(self, resource: int, soft: int, hard: int) -> None:
        self.resource = resource
        self.soft = soft
        self.hard = hard


class ProcessSpec:
    """runtime-spec config.md "process"."""

    __slots__ = ("args", "console_size", "cwd", "env", "no_new_privileges", "oom_score_adj",
                 "rlimits", "terminal", "user")

    def __init__(self, args: tuple[str, ...], env: tuple[str, ...] = (), cwd: str = "/",
                 user: User | None = None, terminal: bool = False,
                 console_size: tuple[int, int] | None = None,  # (rows, cols)
                 rlimits: tuple[Rlimit, ...] = (), no_new_privileges: bool = False,
                 oom_score_adj: int | None = None) -> None:
        self.args = args
        self.env = env
        self.cwd = cwd
        self.user = User() if user is None else user
        self.terminal = terminal
        self.console_size = console_size
        self.rlimits = rlimits
        self.no_new_privileges = no_new_privileges
        self.oom_score_adj = oom_score_adj

    def getenv(self, name: str) -> str | None:
        prefix = name + "="
        for item in reversed(self.env):
            if item.startswith(prefix):
                return item[len(prefix):]
        return None


class Mount:
    """runtime-spec config.md "mounts": flags and data split as mount(2) wants them."""

    __slots__ = ("data", "destination", "flags", "propagation", "source", "type")

    def __init__(self, destination: str, type: str, source: str, flags: int = 0,
                 propagation: int = 0, data: str = "") -> None:
        self.destination = destination
        self.type = type
        self.source = source
        self.flags = flags
        self.propagation = propagation
        self.data = data

    @property
    def is_bind(self) -> bool:
        return self.type == "bind" or bool(self.flags & sc.MS_BIND)


class Device:
    """runtime-spec config-linux.md "devices"."""

    __slots__ = ("gid", "major", "minor", "mode", "path", "type", "uid")

    def __init__(self, path: str, type: str, major: int, minor: int, mode: int = 0o666,
                 uid: int = 0, gid: int = 0) -> None:
        self.path = path
        self.type = type
        self.major = major
        self.minor = minor
        self.mode = mode
        self.uid = uid
        self.gid = gid


class ContainerSpec:
    __slots__ = ("devices", "domainname", "hostname", "masked_paths", "mounts", "process",
                 "readonly_paths", "readonly_root", "sysctl")

    def __init__(self, process: ProcessSpec, readonly_root: bool = False, hostname: str = "",
                 domainname: str = "", mounts: tuple[Mount, ...] = (),
                 devices: tuple[Device, ...] = (), masked_paths: tuple[str, ...] = (),
                 readonly_paths: tuple[str, ...] = (),
                 sysctl: tuple[tuple[str, str], ...] = ()) -> None:
        self.process = process
        self.readonly_root = readonly_root
        self.hostname = hostname
        self.domainname = domainname
        self.mounts = mounts
        self.devices = devices
        self.masked_paths = masked_paths
        self.readonly_paths = readonly_paths
        self.sysctl = sysctl


# ---------------------------------------------------------------------------- checks


def _dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{what} must be an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError(f"{what} must be a list")
    return value


def _strs(value: Any, what: str) -> tuple[str, ...]:
    items = _list(value, what)
    if not all(isinstance(s, str) and "\0" not in s for s in items):
        raise SpecError(f"{what} must be a list of strings")
    return tuple(items)


def _int(value: Any, what: str, lo: int, hi: int, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise SpecError(f"{what} must be an integer in [{lo}, {hi}]")
    return value


def _str(value: Any, what: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str) or "\0" in value:
        raise SpecError(f"{what} must be a string")
    return value


def _abs(value: Any, what: str) -> str:
    path = _str(value, what)
    if not path.startswith("/"):
        raise SpecError(f"{what} must be an absolute path, not {path!r}")
    return path


# ---------------------------------------------------------------------------- process


def parse_process(obj: Any, what: str = "process") -> ProcessSpec:
    proc = _dict(obj, what)
    args = _strs(proc.get("args"), f"{what}.args")
    if not args or not args[0]:
        raise SpecError(f"{what}.args must not be empty")
    env = _strs(proc.get("env"), f"{what}.env")
    cwd = _abs(proc.get("cwd", "/"), f"{what}.cwd")
    u = _dict(proc.get("user"), f"{what}.user")
    user = User(
        _int(u.get("uid"), f"{what}.user.uid", 0, _MAX_ID, 0),
        _int(u.get("gid"), f"{what}.user.gid", 0, _MAX_ID, 0),
        tuple(_int(g, f"{what}.user.additionalGids", 0, _MAX_ID)
              for g in _list(u.get("additionalGids"), f"{what}.user.additionalGids")),
        _int(u.get("umask"), f"{what}.user.umask", 0, 0o777, 0o022),
    )
    terminal = proc.get("terminal", False)
    if not isinstance(terminal, bool):
        raise SpecError(f"{what}.terminal must be a boolean")
    console_size = None
    if proc.get("consoleSize") is not None:
        cs = _dict(proc["consoleSize"], f"{what}.consoleSize")
        console_size = (_int(cs.get("height"), f"{what}.consoleSize.height", 0, 65535, 0),
                        _int(cs.get("width"), f"{what}.consoleSize.width", 0, 65535, 0))
    rlimits = []
    for item in _list(proc.get("rlimits"), f"{what}.rlimits"):
        rl = _dict(item, f"{what}.rlimits[]")
        name = _str(rl.get("type"), f"{what}.rlimits[].type")
        if name not in sc.RLIMITS:
            raise SpecError(f"{what}.rlimits: unknown rlimit {name!r}")
        rlimits.append(Rlimit(sc.RLIMITS[name],
                              _int(rl.get("soft"), f"{what}.rlimits[].soft", 0, 2**64 - 1),
                              _int(rl.get("hard"), f"{what}.rlimits[].hard", 0, 2**64 - 1)))
    nnp = proc.get("noNewPrivileges", False)
    if not isinstance(nnp, bool):
        raise SpecError(f"{what}.noNewPrivileges must be a boolean")
    oom = proc.get("oomScoreAdj")
    return ProcessSpec(
        args=args, env=env, cwd=cwd, user=user, terminal=terminal, console_size=console_size,
        rlimits=tuple(rlimits), no_new_privileges=nnp,
        oom_score_adj=None if oom is None else _int(oom, f"{what}.oomScoreAdj", -1000, 1000),
    )


# ---------------------------------------------------------------------------- mounts

# option -> (flags to set, flags to clear); runc's table (libcontainer/specconv).
_MOUNT_FLAGS: dict[str, tuple[int, int]] = {
    "defaults": (0, 0),
    "ro": (sc.MS_RDONLY, 0), "rw": (0, sc.MS_RDONLY),
    "nosuid": (sc.MS_NOSUID, 0), "suid": (0, sc.MS_NOSUID),
    "nodev": (sc.MS_NODEV, 0), "dev": (0, sc.MS_NODEV),
    "noexec": (sc.MS_NOEXEC, 0), "exec": (0, sc.MS_NOEXEC),
    "sync": (sc.MS_SYNCHRONOUS, 0), "async": (0, sc.MS_SYNCHRONOUS),
    "dirsync": (sc.MS_DIRSYNC, 0),
    "remount": (sc.MS_REMOUNT, 0),
    "mand": (sc.MS_MANDLOCK, 0), "nomand": (0, sc.MS_MANDLOCK),
    "noatime": (sc.MS_NOATIME, 0), "atime": (0, sc.MS_NOATIME),
    "nodiratime": (sc.MS_NODIRATIME, 0), "diratime": (0, sc.MS_NODIRATIME),
    "relatime": (sc.MS_RELATIME, 0), "norelatime": (0, sc.MS_RELATIME),
    "strictatime": (sc.MS_STRICTATIME, 0), "nostrictatime": (0, sc.MS_STRICTATIME),
    "nosymfollow": (sc.MS_NOSYMFOLLOW, 0),
    "bind": (sc.MS_BIND, 0), "rbind": (sc.MS_BIND | sc.MS_REC, 0),
}
_PROPAGATION: dict[str, int] = {
    "private": sc.MS_PRIVATE, "rprivate": sc.MS_PRIVATE | sc.MS_REC,
    "shared": sc.MS_SHARED, "rshared": sc.MS_SHARED | sc.MS_REC,
    "slave": sc.MS_SLAVE, "rslave": sc.MS_SLAVE | sc.MS_REC,
    "unbindable": sc.MS_UNBINDABLE, "runbindable": sc.MS_UNBINDABLE | sc.MS_REC,
}
_IGNORED_OPTIONS = frozenset({"tmpcopyup", "lazytime", "nolazytime"})


def parse_mount_options(options: tuple[str, ...]) -> tuple[int, int, str]:
    """(flags, propagation flags, data) from a runtime-spec mount's options."""
    flags = propagation = 0
    data: list[str] = []
    for opt in options:
        if opt in _MOUNT_FLAGS:
            set_, clear = _MOUNT_FLAGS[opt]
            flags = (flags | set_) & ~clear
        elif opt in _PROPAGATION:
            propagation = _PROPAGATION[opt]
        elif opt not in _IGNORED_OPTIONS:
            data.append(opt)
    return flags, propagation, ",".join(data)


def parse_mount(obj: Any) -> Mount:
    m = _dict(obj, "mounts[]")
    dest = _abs(m.get("destination"), "mounts[].destination")
    flags, propagation, data = parse_mount_options(_strs(m.get("options"), f"mount {dest}"))
    return Mount(dest, _str(m.get("type"), f"mount {dest} type"),
                 _str(m.get("source"), f"mount {dest} source"), flags, propagation, data)


def parse_device(obj: Any) -> Device:
    d = _dict(obj, "linux.devices[]")
    path = _abs(d.get("path"), "linux.devices[].path")
    kind = _str(d.get("type"), f"device {path} type")
    if kind not in ("c", "u", "b", "p"):
        raise SpecError(f"device {path}: unknown type {kind!r}")
    return Device(path, kind,
                  _int(d.get("major"), f"device {path} major", 0, 2**31, 0),
                  _int(d.get("minor"), f"device {path} minor", 0, 2**31, 0),
                  _int(d.get("fileMode"), f"device {path} fileMode", 0, 0o7777, 0o666),
                  _int(d.get("uid"), f"device {path} uid", 0, _MAX_ID, 0),
                  _int(d.get("gid"), f"device {path} gid", 0, _MAX_ID, 0))


def parse_container(spec: dict[str, Any]) -> ContainerSpec:
    root = _dict(spec.get("root"), "root")
    readonly = root.get("readonly", False)
    if not isinstance(readonly, bool):
        raise SpecError("root.readonly must be a boolean")
    linux = _dict(spec.get("linux"), "linux")
    sysctl = _dict(linux.get("sysctl"), "linux.sysctl")
    for key, value in sysctl.items():
        if not isinstance(value, str) or "/" in key or ".." in key:
            raise SpecError(f"linux.sysctl {key!r} is invalid")
    return ContainerSpec(
        process=parse_process(spec.get("process")),
        readonly_root=readonly,
        hostname=_str(spec.get("hostname"), "hostname"),
        domainname=_str(spec.get("domainname"), "domainname"),
        mounts=tuple(parse_mount(m) for m in _list(spec.get("mounts"), "mounts")),
        devices=tuple(parse_device(d) for d in _list(linux.get("devices"), "linux.devices")),
        masked_paths=tuple(_abs(p, "linux.maskedPaths[]")
                           for p in _list(linux.get("maskedPaths"), "linux.maskedPaths")),
        readonly_paths=tuple(_abs(p, "linux.readonlyPaths[]")
                             for p in _list(linux.get("readonlyPaths"), "linux.readonlyPaths")),
        sysctl=tuple(sorted(sysctl.items())),
    )
