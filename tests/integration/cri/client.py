"""A small CRI v1 client: Hull's own cri.proto compiled with grpcio-tools at first use.

The generated modules go to a directory keyed by the proto's hash (nothing generated is
kept in the tree), which is put on sys.path: grpcio-tools' ``cri_pb2_grpc`` imports
``cri_pb2`` as a top-level module.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

PROTO = Path(__file__).with_name("cri.proto")


def _generate() -> Path:
    digest = hashlib.sha256(PROTO.read_bytes()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"hull-cri-{digest}"
    if not (out / "cri_pb2_grpc.py").exists():
        from grpc_tools import protoc  # type: ignore[import-untyped]

        tmp = Path(tempfile.mkdtemp(prefix="hull-cri-gen-"))
        code = protoc.main(["grpc_tools.protoc", f"-I{PROTO.parent}", f"--python_out={tmp}",
                            f"--grpc_python_out={tmp}", str(PROTO)])
        if code != 0:
            raise RuntimeError(f"protoc failed on {PROTO} ({code})")
        with contextlib.suppress(OSError):  # another process made it first
            tmp.rename(out)
    return out


def modules() -> tuple[types.ModuleType, types.ModuleType]:
    """(cri_pb2, cri_pb2_grpc)."""
    out = str(_generate())
    if out not in sys.path:
        sys.path.insert(0, out)
    return importlib.import_module("cri_pb2"), importlib.import_module("cri_pb2_grpc")


pb, pb_grpc = modules()


class Cri:
    """RuntimeService and ImageService stubs on one unix socket."""

    def __init__(self, socket: Path, timeout: float = 240) -> None:
        import grpc

        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.runtime = pb_grpc.RuntimeServiceStub(self.channel)
        self.images = pb_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        service = self.images if method in ("ListImages", "ImageStatus") else self.runtime
        return getattr(service, method)(request, timeout=timeout or self.timeout)

    # ------------------------------------------------------------ helpers

    def run_pod(self, name: str, handler: str, *, uid: str = "", cpu_quota: int = 0,
                cpu_period: int = 0, memory: int = 0,
                annotations: dict[str, str] | None = None) -> tuple[str, Any]:
        """RunPodSandbox; returns (pod id, the PodSandboxConfig to pass to CreateContainer)."""
        linux = pb.LinuxPodSandboxConfig(
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER,
                                                     ipc=pb.POD)))
        if cpu_quota or memory:
            linux.resources.CopyFrom(pb.LinuxContainerResources(
                cpu_quota=cpu_quota, cpu_period=cpu_period, memory_limit_in_bytes=memory))
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid or f"uid-{name}",
                                           namespace="default", attempt=0),
            hostname=name, labels={"app": name}, annotations=annotations or {}, linux=linux)
        reply = self.call("RunPodSandbox", pb.RunPodSandboxRequest(config=config,
                                                                   runtime_handler=handler))
        return reply.pod_sandbox_id, config

    def create_container(self, pod_id: str, pod_config: Any, name: str, image: str,
                         command: list[str]) -> str:
        config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name),
                                    image=pb.ImageSpec(image=image), command=command,
                                    labels={"container": name})
        reply = self.call("CreateContainer", pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config))
        return str(reply.container_id)

    def start_container(self, cid: str) -> None:
        self.call("StartContainer", pb.StartContainerRequest(container_id=cid))

    def exec_sync(self, cid: str, cmd: list[str], timeout: int = 60) -> Any:
        return self.call("ExecSync", pb.ExecSyncRequest(container_id=cid, cmd=cmd,
                                                         timeout=timeout))

    def container_status(self, cid: str) -> Any:
        return self.call("ContainerStatus",
                         pb.ContainerStatusRequest(container_id=cid)).status

    def pod_status(self, pod_id: str) -> Any:
        return self.call("PodSandboxStatus",
                         pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status

    def stop_pod(self, pod_id: str) -> None:
        self.call("StopPodSandbox", pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_pod(self, pod_id: str) -> None:
        self.call("RemovePodSandbox", pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def pods(self) -> list[str]:
        reply = self.call("ListPodSandbox", pb.ListPodSandboxRequest())
        return [item.id for item in reply.items]
