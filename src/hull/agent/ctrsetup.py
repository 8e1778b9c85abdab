"""What the agent prepares for a container besides its rootfs: cgroup and namespaces to join;
and the stats_container / update_container requests on that cgroup.

Namespace paths in a spec are HOST paths (containerd names /proc/<pause pid>/ns/net on
the host): they cannot be opened in the guest. A namespace entry with a path means "the
sandbox's": the agent joins the namespace of the pod's sandbox container (the container
named by the CRI sandbox-id annotation, else the first container of the VM still
running). Without such a container, a network entry with a path is the guest's own
network namespace (the VM's network is the pod's); other types get a new namespace.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from hull.agent import spawn
from hull.agent.cgroup import Cgroup, CgroupError, check_fits_vm, relative_path
from hull.agent.cgroup import parse as parse_resources
from hull.agent.container import Container
from hull.agent.spec import ContainerSpec

Warn = Callable[[str], None]
_SANDBOX_ANNOTATIONS = ("io.kubernetes.cri.sandbox-id", "io.kubernetes.cri-o.SandboxID")


class SetupRefused(ValueError):
    """The container cannot be set up as asked; the message names the field."""


def make_cgroup(root: str | None, cid: str, cspec: ContainerSpec, warn: Warn
                ) -> Cgroup | None:
    """Create the container's cgroup and apply linux.resources (None: no cgroup root)."""
    if root is None:
        if cspec.resources is not None and cspec.resources.files:
            warn(f"container {cid}: no cgroup root, linux.resources not applied")
        return None
    cg = Cgroup(root, relative_path(cspec.cgroups_path, cid))
    try:
        cg.create()
    except OSError as exc:
        raise SetupRefused(f"linux.cgroupsPath: create {cg.path}: "
                           f"{os.strerror(exc.errno or 0).lower()}") from None
    if cspec.resources is not None:
        for text in cspec.resources.warnings:
            warn(f"container {cid}: {text}")
        try:
            cg.apply(cspec.resources)
        except CgroupError as exc:
            cg.remove()
            raise SetupRefused(f"linux.resources: {exc}") from None
    cg.oom_seen = cg.oom_kills()
    return cg


def sandbox_of(containers: Mapping[str, Container], cspec: ContainerSpec
               ) -> Container | None:
    for key in _SANDBOX_ANNOTATIONS:
        ctr = containers.get(cspec.annotations.get(key, ""))
        if ctr is not None and ctr.init.alive and ctr.init.pid is not None:
            return ctr
    for ctr in containers.values():
        if ctr.init.alive and ctr.init.pid is not None:
            return ctr
    return None


def join_fds(containers: Mapping[str, Container], cspec: ContainerSpec, warn: Warn
             ) -> dict[str, int]:
    """Open the namespaces a new container joins: spec type -> fd (the caller closes)."""
    wanted = {kind: path for kind, path in cspec.namespaces.items() if path}
    if not wanted:
        return {}
    for kind in ("mount", "user"):
        if kind in wanted:
            raise SetupRefused(f"linux.namespaces: joining another {kind} namespace is not "
                               "supported")
    target = sandbox_of(containers, cspec)
    fds: dict[str, int] = {}
    try:
        for kind, path in wanted.items():
            if target is None:
                if kind != "network":
                    warn(f"linux.namespaces {kind} path {path}: no container of the sandbox "
                         "to join, a new namespace is created")
                continue
            name = spawn.NS_FLAGS[kind][1]
            fds[kind] = os.open(f"/proc/{target.init.pid}/ns/{name}",
                                os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def stats(ctr: Container) -> dict[str, object]:
    if ctr.cgroup is None:
        return {}
    return ctr.cgroup.stats()


def update(ctr: Container, resources: dict[str, object], warn: Warn) -> None:
    """Apply linux.resources to a running container; refuse what the VM cannot give."""
    if ctr.cgroup is None:
        raise SetupRefused(f"container {ctr.id} has no cgroup")
    try:
        res = parse_resources(resources, "resources")
        check_fits_vm(res, "resources")
        for text in res.warnings:
            warn(f"container {ctr.id}: {text}")
        ctr.cgroup.apply(res)
    except CgroupError as exc:
        raise SetupRefused(f"container {ctr.id}: {exc}") from None


def freeze(ctr: Container, frozen: bool) -> None:
    """Freeze or thaw the container's cgroup (pause of one container of a pod)."""
    if ctr.cgroup is None:
        raise SetupRefused(f"container {ctr.id} has no cgroup to freeze")
    try:
        ctr.cgroup.freeze(frozen)
    except CgroupError as exc:
        raise SetupRefused(f"container {ctr.id}: {exc}") from None
