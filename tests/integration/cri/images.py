"""Container images made locally, with no registry: a pause image and a busybox image.

Each is written as an OCI image layout in a tar archive (oci-layout, index.json, blobs:
one uncompressed layer, the config, the manifest) that ``ctr images import`` loads. The
index names the image with ``io.containerd.image.name``, which ctr's importer uses as
the image's full reference. The pause program is the MEASUREMENTS.md recipe: a static C
program that sleeps until SIGTERM/SIGINT and reaps children, run as 65535:65535.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

PAUSE_IMAGE = "docker.io/hull/pause:test"
BUSYBOX_IMAGE = "docker.io/hull/busybox:test"
BUSYBOX = Path("/bin/busybox")

PAUSE_C = r"""
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
static void quit(int sig) { (void)sig; _exit(0); }

int main(void) {
    signal(SIGCHLD, reap);
    signal(SIGINT, quit);
    signal(SIGTERM, quit);
    for (;;) pause();
}
"""

Entry = tuple[str, bytes | None, str | None, int]  # name, file data, symlink target, mode


def _layer(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, target, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, 0
            if target is not None:
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes, media_type: str) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def write_archive(path: Path, name: str, entries: list[Entry],
                  config: dict[str, Any]) -> Path:
    """An OCI archive of a one-layer image called name."""
    blobs: dict[str, bytes] = {}
    layer = _layer(entries)
    layer_desc = _blob(blobs, layer, "application/vnd.oci.image.layer.v1.tar")
    image_config = {
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
        "history": [{"created_by": "hull tests/integration/cri/images.py"}],
    }
    config_desc = _blob(blobs, json.dumps(image_config).encode(),
                        "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    manifest_desc = _blob(blobs, json.dumps(manifest).encode(),
                          "application/vnd.oci.image.manifest.v1+json")
    manifest_desc["annotations"] = {"io.containerd.image.name": name,
                                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}
    manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [manifest_desc]}
    files = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
             "index.json": json.dumps(index).encode()}
    files.update({f"blobs/sha256/{d.split(':', 1)[1]}": data for d, data in blobs.items()})
    with tarfile.open(path, "w") as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for fname, data in files.items():
            info = tarfile.TarInfo(fname)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def pause_archive(path: Path) -> Path:
    if not shutil.which("gcc"):
        raise RuntimeError("gcc is missing: apt-get install build-essential")
    with tempfile.TemporaryDirectory(prefix="hull-pause-") as tmp:
        src, exe = Path(tmp) / "pause.c", Path(tmp) / "pause"
        src.write_text(PAUSE_C)
        subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(exe), str(src)], check=True,
                       capture_output=True)
        binary = exe.read_bytes()
    entries: list[Entry] = [("pause", binary, None, 0o755)]
    return write_archive(path, PAUSE_IMAGE, entries,
                         {"Entrypoint": ["/pause"], "User": "65535:65535",
                          "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]})


def busybox_archive(path: Path) -> Path:
    if not BUSYBOX.exists():
        raise RuntimeError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    entries: list[Entry] = [(d, None, None, 0o755) for d in
                            ("bin", "dev", "etc", "proc", "sys", "root", "var", "www")]
    entries.append(("tmp", None, None, 0o1777))
    entries.append(("bin/busybox", BUSYBOX.read_bytes(), None, 0o755))
    entries += [(f"bin/{a}", None, "busybox", 0o777) for a in applets if a != "busybox"]
    entries.append(("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                    b"nobody:x:65534:65534:nobody:/:/bin/false\n", None, 0o644))
    entries.append(("etc/group", b"root:x:0:\nnobody:x:65534:\n", None, 0o644))
    entries.append(("www/index.html", b"hello from the other container\n", None, 0o644))
    return write_archive(path, BUSYBOX_IMAGE, entries,
                         {"Cmd": ["sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"})
