"""Hull's protobuf messages for ttrpc and the containerd shim v2 contract.

The ``*.proto`` files beside this module are Hull's own, written from the field numbers
in INTEGRATION.md §2 (no containerd source is vendored). The ``*_pb2.py`` modules and
their ``.pyi`` stubs are generated from them with grpcio-tools (and mypy-protobuf for the
stubs) and are never edited by hand: ``scripts/gen-proto.sh`` (``python -m
hull.shim.proto``) regenerates them, and importing this package checks that they match
the ``.proto`` files (a stamp holds the sources' digest) and regenerates them when they
are stale and the directory is writable, as it is with ``pip install -e``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from hull.errors import HullError

PROTO_DIR = Path(__file__).resolve().parent
#: The directory protoc's import paths are relative to (``hull/shim/proto/x.proto``), so
#: the generated modules import each other as ``hull.shim.proto.x_pb2``.
SRC_ROOT = PROTO_DIR.parents[2]
STAMP = PROTO_DIR / "_generated.sha256"
SOURCES = ("ttrpc", "types", "task_types", "shim", "events", "events_service",
           "runtimeoptions", "cgroups_v2")


class ProtoError(HullError):
    """The generated protobuf modules are missing or stale and cannot be regenerated."""


def digest() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (PROTO_DIR / f"{name}.proto").read_bytes())
    return h.hexdigest()


def is_current() -> bool:
    try:
        stamp = STAMP.read_text().strip()
    except OSError:
        return False
    return stamp == digest() and all((PROTO_DIR / f"{n}_pb2.py").exists() for n in SOURCES)


def generate() -> None:
    """Compile every .proto into a scratch directory, then move the results in place."""
    try:
        import grpc_tools  # type: ignore[import-untyped]
        from grpc_tools import protoc
    except ImportError as exc:
        raise ProtoError("grpcio-tools is not installed: pip install -e .") from exc
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    mypy_plugin = shutil.which("protoc-gen-mypy") or str(
        Path(sys.executable).parent / "protoc-gen-mypy")
    with tempfile.TemporaryDirectory(prefix="hull-proto-") as out:
        args = ["grpc_tools.protoc", f"-I{SRC_ROOT}", f"-I{well_known}",
                f"--python_out={out}"]
        if os.access(mypy_plugin, os.X_OK):
            args += [f"--plugin=protoc-gen-mypy={mypy_plugin}", f"--mypy_out=quiet:{out}"]
        args += [f"hull/shim/proto/{name}.proto" for name in SOURCES]
        if protoc.main(args) != 0:
            raise ProtoError(f"protoc failed on {PROTO_DIR}/*.proto")
        produced = Path(out) / "hull/shim/proto"
        for path in sorted(produced.iterdir()):
            # rename() is atomic: a concurrent importer sees the old or the new module.
            tmp = PROTO_DIR / f".{path.name}.tmp{os.getpid()}"
            shutil.copyfile(path, tmp)
            os.replace(tmp, PROTO_DIR / path.name)
    tmp = PROTO_DIR / f".stamp.tmp{os.getpid()}"
    tmp.write_text(digest() + "\n")
    os.replace(tmp, STAMP)


def ensure() -> None:
    if is_current():
        return
    if not os.access(PROTO_DIR, os.W_OK):
        raise ProtoError(f"generated protobuf modules in {PROTO_DIR} are stale and the "
                         "directory is read-only: run scripts/gen-proto.sh")
    generate()


ensure()
