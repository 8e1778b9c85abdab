"""Loading and checking configuration.toml.

One table of settings drives parsing, checking and documentation: each key has a type and
a default; unknown keys and wrong types are rejected with the key named.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hull.errors import ConfigError

DEFAULT_PATH = Path("/etc/hull/configuration.toml")
ENV_VAR = "HULL_CONFIG"
ACCELERATORS = ("auto", "kvm", "tcg")
CHANNELS = ("auto", "virtio-serial", "vsock")
MACHINE_TYPES = ("microvm", "q35", "virt")
#: The guest architecture (uname -m) of each machine type: "virt" is aarch64's.
MACHINE_ARCH = {"microvm": "x86_64", "q35": "x86_64", "virt": "aarch64"}
#: The machine type an empty hypervisor.machine_type means, by host architecture.
DEFAULT_MACHINE = {"x86_64": "microvm", "aarch64": "virt"}


def host_arch() -> str:
    return os.uname().machine  # as platform.machine(), without importing platform


@dataclass
class HypervisorConfig:
    #: Empty: qemu-system-<the guest architecture> (filled in by resolve_defaults()).
    path: str = ""
    kernel: str = ""
    image: str = ""
    #: Empty: the host architecture's machine (filled in by resolve_defaults()); "virt"
    #: runs an aarch64 guest, emulated (TCG) on an x86_64 host.
    machine_type: str = ""
    default_vcpus: int = 1
    default_memory_mib: int = 256
    accelerator: str = "auto"
    kernel_params: str = ""
    debug_console: bool = False
    boot_timeout: float = 30.0
    sandbox: bool = True
    run_as: str = ""
    #: let QEMU's memory use transparent huge pages (False: PR_SET_THP_DISABLE before
    #: exec; docs/performance.md, host memory)
    transparent_huge_pages: bool = False
    #: the agent channel: "auto" (vsock when /dev/vhost-vsock opens, else virtio-serial),
    #: "virtio-serial" or "vsock" (hull.hypervisor.vsock)
    channel: str = "auto"

    def __post_init__(self) -> None:
        self.resolve_defaults()

    @property
    def arch(self) -> str:
        """The guest's architecture (uname -m), from the machine type."""
        return MACHINE_ARCH.get(self.machine_type or DEFAULT_MACHINE.get(host_arch(), ""),
                                host_arch())

    def resolve_defaults(self) -> None:
        """Fill the keys whose default depends on the host or on another key."""
        if not self.machine_type:
            self.machine_type = DEFAULT_MACHINE.get(host_arch(), "microvm")
        if not self.path:
            self.path = f"qemu-system-{self.arch}"

    def check(self) -> None:
        self.resolve_defaults()
        _one_of("hypervisor.accelerator", self.accelerator, ACCELERATORS)
        _one_of("hypervisor.machine_type", self.machine_type, MACHINE_TYPES)
        _one_of("hypervisor.channel", self.channel, CHANNELS)
        _in_range("hypervisor.default_vcpus", self.default_vcpus, 1, 256)
        _in_range("hypervisor.default_memory_mib", self.default_memory_mib, 64, 1 << 20)
        _in_range("hypervisor.boot_timeout", self.boot_timeout, 1, 3600)


@dataclass
class RuntimeConfig:
    asset_dir: str = "/var/lib/hull"
    #: "section.key" names a pod may override with an io.hull.config.<section>.<key>
    #: annotation (see hull.config.annotations); empty: no overrides.
    annotation_allowlist: list[str] = field(default_factory=list)

    def check(self) -> None:
        if not os.path.isabs(self.asset_dir):
            raise ConfigError(f"runtime.asset_dir must be an absolute path, not {self.asset_dir!r}")
        for name in self.annotation_allowlist:
            section, _, key = name.partition(".")
            if section not in SECTIONS or key not in {
                    f.name for f in fields(SECTIONS[section])}:
                raise ConfigError(f"runtime.annotation_allowlist: {name!r} is not a "
                                  "configuration key (section.key)")
            if name in NOT_OVERRIDABLE:
                raise ConfigError(f"runtime.annotation_allowlist: {name} cannot be "
                                  "overridden by annotations")


#: factory.pool_size's bound: each pooled clone is an idle VM.
MAX_POOL = 64


@dataclass
class FactoryConfig:
    """VM templates (hull.runtime.factory): new sandboxes are clones of a booted one."""

    enabled: bool = False
    #: Where templates live: their RAM is a file here, so a tmpfs (or hugetlbfs).
    template_dir: str = "/dev/shm/hull-factory"
    #: Clones of the default-size template restored ahead of demand by a pool daemon
    #: (hull.runtime.pool); 0: none, every sandbox restores its own clone.
    pool_size: int = 0
    #: The factory's daemon (the pool daemon, with no clones when pool_size is 0) keeps
    #: a fork server for the proxies of CLI sandboxes (hull.runtime.forkserver).
    fork_server: bool = True
    #: Seconds a clone may take to restore before Hull gives up and boots cold.
    restore_timeout: float = 10.0
    #: A sandbox that finds no usable template for its key (none, stale, corrupt) boots
    #: cold and has it built in the background (hull.runtime.rebuild).
    auto_rebuild: bool = True

    def check(self) -> None:
        if not os.path.isabs(self.template_dir):
            raise ConfigError("factory.template_dir must be an absolute path, not "
                              f"{self.template_dir!r}")
        _in_range("factory.pool_size", self.pool_size, 0, MAX_POOL)
        _in_range("factory.restore_timeout", self.restore_timeout, 0.1, 600)


#: The tables of configuration.toml and the dataclass of each.
SECTIONS: dict[str, type[Any]] = {"hypervisor": HypervisorConfig, "runtime": RuntimeConfig,
                                  "factory": FactoryConfig}
#: Keys no annotation may set, whatever the allow-list says.
NOT_OVERRIDABLE = frozenset({"runtime.annotation_allowlist", "runtime.asset_dir",
                             "factory.template_dir"})


@dataclass
class Config:
    hypervisor: HypervisorConfig = field(default_factory=HypervisorConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    factory: FactoryConfig = field(default_factory=FactoryConfig)
    source: Path | None = None

    @property
    def asset_dir(self) -> Path:
        return Path(self.runtime.asset_dir)

    def check(self) -> None:
        self.hypervisor.check()
        self.runtime.check()
        self.factory.check()

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """The effective settings, one table per section (as configuration.toml)."""
        return {name: {f.name: getattr(getattr(self, name), f.name)
                       for f in fields(getattr(self, name))} for name in SECTIONS}


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, not {value!r}")


def _in_range(key: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{key}={value} is outside [{lo}, {hi}]")


def _fill(section: Any, name: str, table: Any, source: Path) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    known = {f.name: f for f in fields(section)}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {name}.{key}")
        want = type(getattr(section, key))
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is list:
            ok = ok and all(isinstance(item, str) for item in value)
            if not ok:
                raise ConfigError(f"{source}: {name}.{key} must be a list of strings")
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"{source}: {name}.{key} must be of type {want.__name__}")
        setattr(section, key, value)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the configuration: ``path``, else $HULL_CONFIG, else the default file if present."""
    explicit = path or os.environ.get(ENV_VAR)
    source = Path(explicit) if explicit else DEFAULT_PATH
    config = Config()
    try:
        data = tomllib.loads(source.read_text())
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"configuration file {source} does not exist") from None
        data = {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {source}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
    else:
        config.source = source
    for name, table in data.items():
        section = getattr(config, name, None) if name in SECTIONS else None
        if section is None:
            raise ConfigError(f"{source}: unknown table [{name}]")
        _fill(section, name, table, source)
    if not data.get("hypervisor", {}).get("path"):
        config.hypervisor.path = ""  # follows the configured machine_type's architecture
    config.check()
    return config
