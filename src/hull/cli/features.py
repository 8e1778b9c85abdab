"""hull features: what this runtime supports (runtime-spec features.md)."""

from __future__ import annotations

import argparse

from hull.cli.common import print_json
from hull.cli.context import Context

NAMESPACES = ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("features", help="show the enabled features")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    print_json({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer",
                  "poststart", "poststop"],
        "mountOptions": ["ro", "rw", "nosuid", "nodev", "noexec", "bind", "rbind",
                         "private", "rprivate", "shared", "rshared", "slave", "rslave",
                         "relatime", "strictatime", "noatime"],
        "linux": {"namespaces": NAMESPACES,
                  "cgroup": {"v1": False, "v2": True, "systemd": False},
                  "seccomp": {"enabled": False},
                  "apparmor": {"enabled": False},
                  "selinux": {"enabled": False}},
        "annotations": {"io.github.hull.vm": "true",
                        "io.github.hull.isolation": "one virtual machine per container"},
    })
    return 0
