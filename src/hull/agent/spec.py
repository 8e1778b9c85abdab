"""The part of an OCI runtime-spec config the agent acts on, checked and typed.

Parsing happens in the agent before any fork, so a malformed spec becomes an ``invalid``
error reply instead of a child that dies halfway. The host validated the bundle already;
the checks here only guard the agent against shapes it cannot act on.
"""

from __future__ import annotations

from hull.agent import syscalls as sc
from hull.agent.caps import Caps, CapsError
from hull.agent.caps import parse as parse_caps

TYPE_CHECKING = False  # not typing's: the agent must not import typing (agentapi/records.py)
if TYPE_CHECKING:
    from typing import Any

    from hull.agent.cgroup import Resources
    from hull.agent.seccomp import Filter


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

    __slots__ = ("apparmor_profile", "args", "capabilities", "console_size", "cwd", "env",
                 "no_new_privileges", "oom_score_adj", "rlimits", "selinux_label", "terminal",
                 "user")

    def __init__(self, args: tuple[str, ...], env: tuple[str, ...] = (), cwd: str = "/",
                 user: User | None = None, terminal: bool = False,
                 console_size: tuple[int, int] | None = None,  # (rows, cols)
                 rlimits: tuple[Rlimit, ...] = (), no_new_privileges: bool = False,
                 oom_score_adj: int | None = None, capabilities: Caps | None = None,
                 apparmor_profile: str = "", selinux_label: str = "") -> None:
        self.args = args
        self.env = env
        self.cwd = cwd
        self.user = User() if user is None else user
        self.terminal = terminal
        self.console_size = console_size
        self.rlimits = rlimits
        self.no_new_privileges = no_new_privileges
        self.oom_score_adj = oom_score_adj
        #: None: the process keeps the capabilities it has (root: all)
        self.capabilities = capabilities
        self.apparmor_profile = apparmor_profile
        self.selinux_label = selinux_label

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


class IdMap:
    """One line of /proc/PID/uid_map (config-linux.md "uidMappings")."""

    __slots__ = ("container_id", "host_id", "size")

    def __init__(self, container_id: int, host_id: int, size: int) -> None:
        self.container_id = container_id
        self.host_id = host_id
        self.size = size


class ContainerSpec:
    __slots__ = ("annotations", "cgroups_path", "devices", "domainname", "gid_mappings",
                 "hostname", "masked_paths", "mounts", "namespaces", "personality", "process",
                 "readonly_paths", "readonly_root", "resources", "rootfs_propagation",
                 "seccomp", "sysctl", "uid_mappings")

    def __init__(self, process: ProcessSpec, readonly_root: bool = False, hostname: str = "",
                 domainname: str = "", mounts: tuple[Mount, ...] = (),
                 devices: tuple[Device, ...] = (), masked_paths: tuple[str, ...] = (),
                 readonly_paths: tuple[str, ...] = (),
                 sysctl: tuple[tuple[str, str], ...] = ()) -> None:
        #: type ("pid", "network", ...) -> path ("" = a new namespace); absent = the guest's
        self.namespaces: dict[str, str] = {}
        self.uid_mappings: tuple[IdMap, ...] = ()
        self.gid_mappings: tuple[IdMap, ...] = ()
        self.seccomp: Filter | None = None
        self.resources: Resources | None = None
        self.cgroups_path = ""
        self.personality: int | None = None
        self.rootfs_propagation = 0
        self.annotations: dict[str, str] = {}
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
    caps = None
    if proc.get("capabilities") is not None:
        try:
            caps = parse_caps(proc["capabilities"], f"{what}.capabilities")
        except CapsError as exc:
            raise SpecError(str(exc)) from None
    return ProcessSpec(
        args=args, env=env, cwd=cwd, user=user, terminal=terminal, console_size=console_size,
        rlimits=tuple(rlimits), no_new_privileges=nnp,
        oom_score_adj=None if oom is None else _int(oom, f"{what}.oomScoreAdj", -1000, 1000),
        capabilities=caps,
        apparmor_profile=_str(proc.get("apparmorProfile"), f"{what}.apparmorProfile"),
        selinux_label=_str(proc.get("selinuxLabel"), f"{what}.selinuxLabel"),
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
    cspec = ContainerSpec(
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
    _parse_linux(cspec, linux)
    annotations = _dict(spec.get("annotations"), "annotations")
    cspec.annotations = {k: v for k, v in annotations.items() if isinstance(v, str)}
    return cspec


NAMESPACES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")
# personality(2) domains runtime-spec names
_PERSONALITY = {"LINUX": 0x0000, "LINUX32": 0x0008}


def _parse_linux(cspec: ContainerSpec, linux: dict[str, Any]) -> None:
    """namespaces, id mappings, seccomp, resources, cgroupsPath, personality, propagation."""
    for item in _list(linux.get("namespaces"), "linux.namespaces"):
        ns = _dict(item, "linux.namespaces[]")
        kind = _str(ns.get("type"), "linux.namespaces[].type")
        if kind not in NAMESPACES:
            raise SpecError(f"linux.namespaces: unknown namespace type {kind!r}")
        if kind in cspec.namespaces:
            raise SpecError(f"linux.namespaces: {kind} is listed twice")
        path = _str(ns.get("path"), f"linux.namespaces {kind} path")
        if path and not path.startswith("/"):
            raise SpecError(f"linux.namespaces {kind} path must be absolute, not {path!r}")
        if kind == "time" and path:
            raise SpecError("linux.namespaces: joining a time namespace is not supported")
        cspec.namespaces[kind] = path
    for key, attr in (("uidMappings", "uid_mappings"), ("gidMappings", "gid_mappings")):
        maps = []
        for m in _list(linux.get(key), f"linux.{key}"):
            d = _dict(m, f"linux.{key}[]")
            maps.append(IdMap(_int(d.get("containerID"), f"linux.{key}[].containerID", 0,
                                   _MAX_ID - 1),
                              _int(d.get("hostID"), f"linux.{key}[].hostID", 0, _MAX_ID - 1),
                              _int(d.get("size"), f"linux.{key}[].size", 1, _MAX_ID)))
        if len(maps) > 340:  # the kernel's limit on lines of a map
            raise SpecError(f"linux.{key} has more than 340 entries")
        setattr(cspec, attr, tuple(maps))
    user_ns = "user" in cspec.namespaces and not cspec.namespaces["user"]
    if (cspec.uid_mappings or cspec.gid_mappings) and not user_ns:
        raise SpecError("linux.uidMappings/gidMappings need a new user namespace in "
                        "linux.namespaces")
    if user_ns and not (cspec.uid_mappings and cspec.gid_mappings):
        raise SpecError("a new user namespace needs linux.uidMappings and linux.gidMappings")
    if linux.get("seccomp") is not None:
        from hull.agent.seccomp import SeccompError, compile_profile

        try:
            cspec.seccomp = compile_profile(linux["seccomp"])
        except SeccompError as exc:
            raise SpecError(str(exc)) from None
    if linux.get("resources") is not None:
        from hull.agent.cgroup import CgroupError
        from hull.agent.cgroup import parse as parse_resources

        try:
            cspec.resources = parse_resources(linux["resources"])
        except CgroupError as exc:
            raise SpecError(str(exc)) from None
    cspec.cgroups_path = _str(linux.get("cgroupsPath"), "linux.cgroupsPath")
    if linux.get("personality") is not None:
        pers = _dict(linux["personality"], "linux.personality")
        domain = _str(pers.get("domain"), "linux.personality.domain")
        if domain not in _PERSONALITY:
            raise SpecError(f"linux.personality.domain: unknown domain {domain!r}")
        if pers.get("flags"):
            raise SpecError("linux.personality.flags are not supported")
        cspec.personality = _PERSONALITY[domain]
    prop = _str(linux.get("rootfsPropagation"), "linux.rootfsPropagation")
    if prop:
        if prop not in _PROPAGATION:
            raise SpecError(f"linux.rootfsPropagation: unknown propagation {prop!r}")
        cspec.rootfs_propagation = _PROPAGATION[prop]
