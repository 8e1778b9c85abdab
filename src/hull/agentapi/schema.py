"""Control messages of the agent API (stream 0 of the channel), defined once for both sides.

A control frame holds one JSON object:

- REQUEST  (host -> agent) ``{"id": int, "method": str, "params": {...}}``
- RESPONSE (agent -> host) ``{"id": int, "result": {...}}`` or
  ``{"id": int, "error": {"kind": str, "message": str}}``
- EVENT    (agent -> host) ``{"event": str, ...}``

The first request on a channel is ``hello``; the agent refuses everything else before it,
and the host refuses an agent whose major ``PROTOCOL_VERSION`` differs.

Everything decoded here is checked for type and bounds: the host treats the guest as
untrusted (a lying guest gets :class:`SchemaError`, and the host drops the VM).
"""

from __future__ import annotations

from hull.agentapi import wirejson

# The guest agent imports this module at every boot: no dataclasses, no typing at run time
# (hull.agentapi.records says why); every CLI shim imports it: no enum (hull.agentapi.enums
# says why). Type checkers see the real dataclasses and enums.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from dataclasses import asdict, dataclass, field
    from enum import StrEnum
    from typing import Any
else:
    from hull.agentapi.enums import StrEnum
    from hull.agentapi.records import asdict, dataclass, field

PROTOCOL_VERSION = 2  # 2: 1 MiB data chunks, 4 MiB windows (framing)
MAX_ID_LEN = 1024
MAX_TEXT = 64 * 1024
MAX_ARGS = 4096
MAX_STREAM_ID = 2**31 - 1


class SchemaError(ValueError):
    """A control message that does not fit the schema."""


class Method(StrEnum):
    HELLO = "hello"
    CREATE_CONTAINER = "create_container"
    START_CONTAINER = "start_container"
    EXEC_PROCESS = "exec_process"
    SIGNAL_PROCESS = "signal_process"
    RESIZE_PTY = "resize_pty"
    DELETE_CONTAINER = "delete_container"
    STATS_CONTAINER = "stats_container"
    UPDATE_CONTAINER = "update_container"
    #: params ContainerRef: freeze / thaw the container's cgroup (cgroup.freeze), for the
    #: pause of one container of a pod while the others run (the shim v2)
    PAUSE_CONTAINER = "pause_container"
    RESUME_CONTAINER = "resume_container"
    #: params: hull.agentapi.network.NetworkConfig; after hello, before any container
    CONFIGURE_NETWORK = "configure_network"
    SHUTDOWN = "shutdown"
    #: Guest-wide figures: memory, CPU time, container count (hull monitor).
    SANDBOX_STATS = "sandbox_stats"
    #: A process in the guest itself, outside every container (hull debug); only when
    #: hypervisor.debug_console is set (the proxy refuses it otherwise, and so does the
    #: agent unless the kernel command line carries hull.debug_console=1).
    DEBUG_EXEC = "debug_exec"
    # Answered by the proxy itself, never forwarded to the agent: they act on the VM.
    PAUSE_SANDBOX = "pause_sandbox"
    RESUME_SANDBOX = "resume_sandbox"
    STOP_SANDBOX = "stop_sandbox"


#: Methods the proxy handles without the agent (see hull.proxy.router).
PROXY_METHODS = frozenset({Method.PAUSE_SANDBOX, Method.RESUME_SANDBOX, Method.STOP_SANDBOX})


class Event(StrEnum):
    PROCESS_EXIT = "process_exit"


class ErrorKind(StrEnum):
    """Error classes the agent reports; the host maps them onto its own exceptions."""

    INVALID = "invalid"  # the request is malformed or names something that cannot work
    NOT_FOUND = "not_found"  # unknown container or process
    EXISTS = "exists"  # a container or process of that id exists already
    STATE = "state"  # the object's state forbids the operation
    FAILED = "failed"  # the operation was valid but failed in the guest (message says why)


# ---------------------------------------------------------------------------- checks


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError(f"{what} is not an object")
    return value


def get_str(obj: dict[str, Any], key: str, *, max_len: int = MAX_TEXT, optional: bool = False
            ) -> str:
    value = obj.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise SchemaError(f"{key} must be a string")
    if len(value) > max_len:
        raise SchemaError(f"{key} is longer than {max_len} characters")
    return value


def get_int(obj: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SchemaError(f"{key} must be an integer")
    if not lo <= value <= hi:
        raise SchemaError(f"{key}={value} is outside [{lo}, {hi}]")
    return value


def get_opt_int(obj: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    return None if obj.get(key) is None else get_int(obj, key, lo, hi)


def get_bool(obj: dict[str, Any], key: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise SchemaError(f"{key} must be a boolean")
    return value


# ---------------------------------------------------------------------------- envelopes


def encode(message: dict[str, Any]) -> bytes:
    return wirejson.dumps(message)


def decode(payload: bytes) -> dict[str, Any]:
    try:
        value = wirejson.loads(payload)
    except wirejson.JSONError as exc:
        raise SchemaError(f"control message is not JSON: {exc}") from None
    return _obj(value, "control message")


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    method: Method
    params: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "method": str(self.method), "params": self.params}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Request:
        try:
            method = Method(get_str(obj, "method", max_len=64))
        except ValueError:
            raise SchemaError(f"unknown method {obj.get('method')!r}") from None
        return cls(get_int(obj, "id", 0, 2**53), method, _obj(obj.get("params", {}), "params"))


@dataclass(frozen=True, slots=True)
class Response:
    id: int
    result: dict[str, Any] | None = None
    error_kind: ErrorKind | None = None
    error_message: str = ""

    def to_json(self) -> dict[str, Any]:
        if self.error_kind is not None:
            return {"id": self.id,
                    "error": {"kind": str(self.error_kind), "message": self.error_message}}
        return {"id": self.id, "result": self.result or {}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Response:
        rid = get_int(obj, "id", 0, 2**53)
        if "error" in obj:
            err = _obj(obj["error"], "error")
            try:
                kind = ErrorKind(get_str(err, "kind", max_len=32))
            except ValueError:
                kind = ErrorKind.FAILED
            return cls(rid, None, kind, get_str(err, "message", max_len=4096))
        return cls(rid, _obj(obj.get("result", {}), "result"))


# ---------------------------------------------------------------------------- payloads


@dataclass(frozen=True, slots=True)
class Stdio:
    """Stream ids of one process; None where the process gets /dev/null.

    With a terminal, the pty's output travels on ``stdout`` and ``stderr`` is None.
    """

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None

    def streams(self) -> list[int]:
        return [s for s in (self.stdin, self.stdout, self.stderr) if s is not None]

    @classmethod
    def from_json(cls, obj: Any) -> Stdio:
        o = _obj(obj, "stdio")
        stdio = cls(*(get_opt_int(o, k, 1, MAX_STREAM_ID) for k in ("stdin", "stdout", "stderr")))
        ids = stdio.streams()
        if len(set(ids)) != len(ids):
            raise SchemaError("stdio uses one stream id twice")
        return stdio


@dataclass(frozen=True, slots=True)
class Hello:
    version: int = PROTOCOL_VERSION
    #: Host entropy (hex) the agent mixes into the guest RNG before anything else runs.
    entropy: str = ""
    #: Host wall clock, so a guest (or a restored template clone) starts with the right time.
    time_ns: int = 0

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Hello:
        return cls(get_int(o, "version", 0, 2**31), get_str(o, "entropy", max_len=1024,
                   optional=True), get_int(o, "time_ns", 0, 2**63))


@dataclass(frozen=True, slots=True)
class HelloReply:
    version: int
    agent_version: str
    kernel_release: str
    #: Boot milestones of the agent (name -> seconds of guest CLOCK_MONOTONIC): "python"
    #: (/init began), "main", "init" (mounts done), "loaded", "port", "hello"; with
    #: HULL_PROFILE=1 on the kernel command line also the kernel's "kernel.unpack",
    #: "kernel.unpacked" and "kernel.init" (/init executed). Informational only.
    boot: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> HelloReply:
        return cls(get_int(o, "version", 0, 2**31), get_str(o, "agent_version", max_len=64),
                   get_str(o, "kernel_release", max_len=256), _marks(o, "boot"))


MAX_MARKS = 32


def _marks(o: dict[str, Any], key: str) -> dict[str, float]:
    """A {name: seconds} object of at most MAX_MARKS short names and sane times."""
    value = _obj(o.get(key, {}), key)
    if len(value) > MAX_MARKS:
        raise SchemaError(f"{key} has more than {MAX_MARKS} entries")
    marks: dict[str, float] = {}
    for name, when in value.items():
        if len(name) > 32:
            raise SchemaError(f"{key}: a name is longer than 32 characters")
        if (not isinstance(when, int | float) or isinstance(when, bool)
                or not 0 <= when <= 1e7):  # also refuses NaN
            raise SchemaError(f"{key}.{name} must be a number of seconds")
        marks[name] = float(when)
    return marks


MAX_SHARE_PATH = 4096
#: A bind mount source the host staged in a share (hull.runtime.sharedfs): the spec sent
#: in create_container says ``hullshare:<tag>/<path in the share>`` instead of a host path.
SHARE_SOURCE_PREFIX = "hullshare:"


@dataclass(frozen=True, slots=True)
class RootfsShare:
    """How the container's root filesystem reaches the guest: a virtio-9p mount tag.

    ``path`` is the rootfs's directory inside the share ("" = the share's root): a pod's
    containers all live in one share (microvm devices cannot be hot-plugged), each under
    its own subdirectory. Relative, without "..", so it cannot leave the share.
    """

    tag: str
    readonly: bool = False
    path: str = ""

    @classmethod
    def from_json(cls, obj: Any) -> RootfsShare:
        o = _obj(obj, "rootfs")
        path = get_str(o, "path", max_len=MAX_SHARE_PATH, optional=True)
        parts = path.split("/")
        if path and (path.startswith("/") or "\0" in path or ".." in parts):
            raise SchemaError(f"rootfs path {path!r} must be relative, without '..'")
        return cls(get_str(o, "tag", max_len=31), get_bool(o, "readonly"), path)


MAX_HOOKS = 64
MAX_HOOK_TIMEOUT = 24 * 3600


def _strings(o: dict[str, Any], key: str) -> list[str]:
    value = o.get(key) or []
    if not isinstance(value, list) or len(value) > MAX_ARGS or not all(
            isinstance(v, str) and len(v) <= MAX_TEXT for v in value):
        raise SchemaError(f"{key} must be a list of strings")
    return value


@dataclass(frozen=True, slots=True)
class Hook:
    """One OCI hook (runtime-spec config.md "POSIX-platform Hooks"): ``args`` empty means
    ``[path]``; ``env`` is the hook's whole environment; ``timeout`` in seconds."""

    path: str
    args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    timeout: int | None = None

    @classmethod
    def from_json(cls, obj: Any) -> Hook:
        o = _obj(obj, "hook")
        path = get_str(o, "path", max_len=MAX_SHARE_PATH)
        if not path.startswith("/") or "\0" in path:
            raise SchemaError(f"hook path {path!r} must be absolute")
        return cls(path, _strings(o, "args"), _strings(o, "env"),
                   get_opt_int(o, "timeout", 1, MAX_HOOK_TIMEOUT))


@dataclass(frozen=True, slots=True)
class GuestHooks:
    """The hooks the agent runs in the container's namespaces, with the container's root
    as their filesystem view: createContainer before pivot_root, startContainer before
    the process's execve. A failing hook fails create or start (runtime-spec config.md).

    ``state`` is the OCI state the host knows (id, bundle, annotations ...); the agent
    sets ``pid`` (the init's, as seen in its own pid namespace, as runc does) and
    ``status`` before writing it to a hook's stdin.
    """

    state: dict[str, Any] = field(default_factory=dict)
    create_container: list[Hook] = field(default_factory=list)
    start_container: list[Hook] = field(default_factory=list)

    @classmethod
    def from_json(cls, obj: Any) -> GuestHooks:
        o = _obj(obj, "hooks")

        def hooks(key: str) -> list[Hook]:
            value = o.get(key) or []
            if not isinstance(value, list) or len(value) > MAX_HOOKS:
                raise SchemaError(f"hooks.{key} must be a list of at most {MAX_HOOKS} hooks")
            return [Hook.from_json(h) for h in value]

        return cls(_obj(o.get("state", {}), "hooks.state"), hooks("create_container"),
                   hooks("start_container"))


def hook_failure(status: int, output: bytes) -> str:
    """How a failed hook is described, on the host and in the guest alike: the exit status
    (or the signal) and the last line the hook wrote."""
    text = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
    lines = output.decode(errors="replace").strip().splitlines()
    return text + (f": {lines[-1].strip()[:500]}" if lines else "")


@dataclass(frozen=True, slots=True)
class CreateContainer:
    """Create the container and its init process, stopped before exec until start."""

    container_id: str
    #: The bundle's config.json, already validated by the host; root.path is ignored.
    spec: dict[str, Any]
    rootfs: RootfsShare
    stdio: Stdio = field(default_factory=Stdio)
    hooks: GuestHooks = field(default_factory=GuestHooks)

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> CreateContainer:
        return cls(get_str(o, "container_id", max_len=MAX_ID_LEN), _obj(o.get("spec"), "spec"),
                   RootfsShare.from_json(o.get("rootfs")), Stdio.from_json(o.get("stdio", {})),
                   GuestHooks.from_json(o.get("hooks", {})))


@dataclass(frozen=True, slots=True)
class ProcessPid:
    """Reply to create_container / exec_process: the process's pid in the guest.

    Informational only: the host never signals or trusts a guest pid.
    """

    pid: int

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> ProcessPid:
        return cls(get_int(o, "pid", 1, 2**22))


@dataclass(frozen=True, slots=True)
class ContainerRef:
    container_id: str

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> ContainerRef:
        return cls(get_str(o, "container_id", max_len=MAX_ID_LEN))


@dataclass(frozen=True, slots=True)
class ExecProcess:
    container_id: str
    exec_id: str
    #: An OCI runtime-spec ``process`` object.
    process: dict[str, Any]
    stdio: Stdio = field(default_factory=Stdio)

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> ExecProcess:
        return cls(get_str(o, "container_id", max_len=MAX_ID_LEN),
                   get_str(o, "exec_id", max_len=MAX_ID_LEN), _obj(o.get("process"), "process"),
                   Stdio.from_json(o.get("stdio", {})))


@dataclass(frozen=True, slots=True)
class SignalProcess:
    container_id: str
    #: "" is the container's init process.
    exec_id: str
    signal: int
    #: Signal every process of the container (runc kill --all).
    all: bool = False

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> SignalProcess:
        return cls(get_str(o, "container_id", max_len=MAX_ID_LEN),
                   get_str(o, "exec_id", max_len=MAX_ID_LEN, optional=True),
                   get_int(o, "signal", 1, 64), get_bool(o, "all"))


@dataclass(frozen=True, slots=True)
class ResizePty:
    container_id: str
    exec_id: str
    rows: int
    cols: int

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> ResizePty:
        return cls(get_str(o, "container_id", max_len=MAX_ID_LEN),
                   get_str(o, "exec_id", max_len=MAX_ID_LEN, optional=True),
                   get_int(o, "rows", 0, 65535), get_int(o, "cols", 0, 65535))


@dataclass(frozen=True, slots=True)
class ProcessExit:
    """EVENT: a container's init ("" exec_id) or exec process ended.

    ``status`` follows the shell convention: the exit code, or 128+N for death by signal N.
    The agent sends it only after the process's output streams have been flushed and
    closed, so the host has all of a process's output when it learns of the exit.
    """

    container_id: str
    exec_id: str
    status: int
    signal: int | None = None
    oom_killed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"event": str(Event.PROCESS_EXIT), **asdict(self)}

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> ProcessExit:
        return cls(get_str(o, "container_id", max_len=MAX_ID_LEN),
                   get_str(o, "exec_id", max_len=MAX_ID_LEN, optional=True),
                   get_int(o, "status", 0, 255), get_opt_int(o, "signal", 1, 64),
                   get_bool(o, "oom_killed"))


@dataclass(frozen=True, slots=True)
class UpdateContainer:
    """Apply an OCI ``linux.resources`` object to the container's cgroup in the guest."""

    container_id: str
    resources: dict[str, Any]

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> UpdateContainer:
        return cls(get_str(o, "container_id", max_len=MAX_ID_LEN),
                   _obj(o.get("resources"), "resources"))


MAX_COUNTER = 2**64 - 1
_MAX_KEYS = 256


def _counters(o: dict[str, Any], key: str) -> dict[str, int]:
    """A {name: non-negative int} object (cpu.stat, memory.stat, memory.events)."""
    value = _obj(o.get(key, {}), key)
    if len(value) > _MAX_KEYS:
        raise SchemaError(f"{key} has more than {_MAX_KEYS} entries")
    for name in value:
        if len(name) > 64:
            raise SchemaError(f"{key}: a key is longer than 64 characters")
        get_int(value, name, 0, MAX_COUNTER)
    return value


@dataclass(frozen=True, slots=True)
class ContainerStats:
    """Reply to stats_container: the cgroup v2 figures of the container's cgroup.

    ``cpu`` is cpu.stat (usage_usec, user_usec, system_usec, ...); memory figures are
    bytes; a ``*_max`` of None means no limit ("max"). ``io`` maps "major:minor" to the
    io.stat fields (rbytes, wbytes, rios, wios, ...).
    """

    cpu: dict[str, int] = field(default_factory=dict)
    memory_current: int = 0
    memory_max: int | None = None
    memory_peak: int = 0
    swap_current: int = 0
    swap_max: int | None = None
    memory_stat: dict[str, int] = field(default_factory=dict)
    memory_events: dict[str, int] = field(default_factory=dict)
    pids_current: int = 0
    pids_max: int | None = None
    io: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> ContainerStats:
        io = _obj(o.get("io", {}), "io")
        if len(io) > _MAX_KEYS:
            raise SchemaError(f"io has more than {_MAX_KEYS} devices")
        for dev in io:
            if len(dev) > 32:
                raise SchemaError("io: a device key is longer than 32 characters")
            _counters(io, dev)
        return cls(
            _counters(o, "cpu"), get_int(o, "memory_current", 0, MAX_COUNTER),
            get_opt_int(o, "memory_max", 0, MAX_COUNTER),
            get_int(o, "memory_peak", 0, MAX_COUNTER),
            get_int(o, "swap_current", 0, MAX_COUNTER),
            get_opt_int(o, "swap_max", 0, MAX_COUNTER), _counters(o, "memory_stat"),
            _counters(o, "memory_events"), get_int(o, "pids_current", 0, MAX_COUNTER),
            get_opt_int(o, "pids_max", 0, MAX_COUNTER), io)


@dataclass(frozen=True, slots=True)
class SandboxStats:
    """Reply to sandbox_stats: the guest's own figures (/proc/meminfo, /proc/stat)."""

    memory_total: int = 0  # bytes
    memory_available: int = 0  # bytes
    cpu_user_usec: int = 0
    cpu_system_usec: int = 0
    cpu_idle_usec: int = 0
    containers: int = 0
    uptime_usec: int = 0

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> SandboxStats:
        return cls(*(get_int(o, f, 0, MAX_COUNTER) for f in (
            "memory_total", "memory_available", "cpu_user_usec", "cpu_system_usec",
            "cpu_idle_usec", "containers", "uptime_usec")))


#: The container id of a debug_exec process in events and routing: the guest itself.
GUEST = ""


@dataclass(frozen=True, slots=True)
class DebugExec:
    """Run ``args`` in the guest's root, outside any container, with stdio on streams.

    Its exit comes as a process_exit event with container_id "" (:data:`GUEST`).
    """

    exec_id: str
    args: list[str]
    env: list[str] = field(default_factory=list)
    stdio: Stdio = field(default_factory=Stdio)

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> DebugExec:
        exec_id = get_str(o, "exec_id", max_len=MAX_ID_LEN)
        if not exec_id:
            raise SchemaError("exec_id must not be empty")
        args = _strings(o, "args")
        if not args or not args[0]:
            raise SchemaError("args must name a program")
        return cls(exec_id, args, _strings(o, "env"), Stdio.from_json(o.get("stdio", {})))


def params(payload: Any) -> dict[str, Any]:
    """A payload dataclass as the JSON params/result object."""
    return asdict(payload)
