"""OCI bundles: the directory with config.json and the root filesystem (runtime-spec
bundle.md, config.md). Checks what Hull needs before anything is started."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hull.agentapi import schema
from hull.errors import BundleError

SUPPORTED_MAJOR = 1


@dataclass(frozen=True)
class Bundle:
    path: Path
    spec: dict[str, Any]

    @property
    def rootfs(self) -> Path:
        root = Path(self.spec["root"]["path"])
        return root if root.is_absolute() else self.path / root

    @property
    def readonly_rootfs(self) -> bool:
        return bool(self.spec["root"].get("readonly", False))

    @property
    def process(self) -> dict[str, Any]:
        process: dict[str, Any] = self.spec["process"]
        return process

    @property
    def terminal(self) -> bool:
        return bool(self.process.get("terminal", False))

    @property
    def annotations(self) -> dict[str, str]:
        annotations: dict[str, str] = self.spec.get("annotations") or {}
        return annotations


def load(path: str | Path) -> Bundle:
    """Read and check ``path/config.json``; every problem is one BundleError line."""
    bundle = Path(path).absolute()
    if not bundle.is_dir():
        raise BundleError(f"bundle {bundle} is not a directory")
    config = bundle / "config.json"
    try:
        spec = json.loads(config.read_text())
    except FileNotFoundError:
        raise BundleError(f"bundle {bundle} has no config.json") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read {config}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"{config} is not valid JSON: {exc}") from exc
    check_spec(spec, config)
    result = Bundle(bundle, spec)
    if not result.rootfs.is_dir():
        raise BundleError(f"rootfs {result.rootfs} of bundle {bundle} is not a directory")
    return result


def check_spec(spec: Any, where: Path | str) -> None:
    if not isinstance(spec, dict):
        raise BundleError(f"{where}: the top level must be a JSON object")
    version = spec.get("ociVersion")
    if not isinstance(version, str) or not version:
        raise BundleError(f"{where}: ociVersion is missing")
    major = version.split(".", 1)[0]
    if major != str(SUPPORTED_MAJOR):
        raise BundleError(f"{where}: unsupported ociVersion {version} "
                          f"(hull supports {SUPPORTED_MAJOR}.x)")
    root = spec.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str) or not root["path"]:
        raise BundleError(f"{where}: root.path is missing")
    if "readonly" in root and not isinstance(root["readonly"], bool):
        raise BundleError(f"{where}: root.readonly must be a boolean")
    process = spec.get("process")
    if not isinstance(process, dict):
        raise BundleError(f"{where}: process is missing")
    check_process(process, f"{where}: process")
    hostname = spec.get("hostname", "")
    if not isinstance(hostname, str) or len(hostname) > 64:
        raise BundleError(f"{where}: hostname must be a string of at most 64 characters")
    check_hooks(spec.get("hooks", {}), where)
    annotations = spec.get("annotations", {})
    if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise BundleError(f"{where}: annotations must map strings to strings")
    check_in_guest_terms(spec, where)


def check_in_guest_terms(spec: dict[str, Any], where: Path | str) -> None:
    """Run the agent's own spec parser on the host, so what the agent would refuse
    (unknown capabilities, a bad seccomp profile, absurd resources, ...) fails before a
    VM boots. The one import of hull.agent outside the guest: the parser is pure."""
    from hull.agent.spec import SpecError, parse_container

    try:
        parse_container(spec)
    except SpecError as exc:
        raise BundleError(f"{where}: {exc}") from None


def check_hooks(hooks: Any, where: Path | str) -> None:
    if not isinstance(hooks, dict):
        raise BundleError(f"{where}: hooks must be an object")
    for kind, entries in hooks.items():
        if not isinstance(entries, list):
            raise BundleError(f"{where}: hooks.{kind} must be a list")
        for i, hook in enumerate(entries):
            # The agent's own check: createContainer/startContainer hooks go to the guest.
            try:
                schema.Hook.from_json(hook)
            except schema.SchemaError as exc:
                raise BundleError(f"{where}: hooks.{kind}[{i}]: {exc}") from None


def check_process(process: dict[str, Any], where: str) -> None:
    args = process.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise BundleError(f"{where}.args must be a non-empty list of strings")
    env = process.get("env", [])
    if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
        raise BundleError(f"{where}.env must be a list of KEY=VALUE strings")
    cwd = process.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise BundleError(f"{where}.cwd must be an absolute path")
    if not isinstance(process.get("terminal", False), bool):
        raise BundleError(f"{where}.terminal must be a boolean")
    user = process.get("user", {})
    if not isinstance(user, dict):
        raise BundleError(f"{where}.user must be an object")
    for key in ("uid", "gid"):
        value = user.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
            raise BundleError(f"{where}.user.{key} must be an integer in [0, 2^32)")
    gids = user.get("additionalGids", [])
    if not isinstance(gids, list) or not all(
            isinstance(g, int) and not isinstance(g, bool) and 0 <= g < 2**32 for g in gids):
        raise BundleError(f"{where}.user.additionalGids must be a list of integers")
