"""VM templates (a VM factory): new sandboxes are clones of a booted, agent-ready VM.

``hull factory init`` boots a template VM whose RAM is a file under factory.template_dir
(a tmpfs), mapped shared; once its agent answers, the guest is paused and its device
state saved through QMP (a migration to a file Hull opened, with x-ignore-shared: the RAM
stays in its file, the stream is only device state). A clone maps the same RAM file
privately (copy-on-write: it shares every page it does not write with the template and
the other clones) and restores the device state (-incoming fd:N) instead of booting.
After the restore the host's hello gives the guest fresh entropy (the agent reseeds the
CRNG) and the host's wall clock; hostnames are per container already.

Templates are keyed by everything that shapes the guest's memory: kernel, image, QEMU
binary (by path, size and mtime), machine type, accelerator, vCPUs, memory size and
kernel parameters. A template that does not match, or whose files do not pass the checks
below, is never used: the sandbox boots cold, with a notice.

Container rootfs: shares cannot be hot-plugged on microvm, so every template has a fixed
set of 9p devices (TEMPLATE_TAGS), exported from an empty directory. The fsdev path is
not part of the migration stream, so a clone's command line points each device at the
clone's own directory (or the empty one when it has no share of that tag). One device:
the shared directory, where the container's rootfs is bound beside its bind sources (the
pod layout, hull.runtime.layout, which every sandbox of an enabled factory uses); a second
device for the rootfs would cost each clone ~1.2 MiB of QEMU memory (docs/performance.md).

Network: nor can NICs be hot-plugged (the guest only sees the virtio-mmio devices the
firmware tables listed at its boot), so every template has TEMPLATE_NICS virtio-net
devices, booted on vnet-header taps in a namespace of their own (PrivateTaps): the guest
then negotiates checksum and segmentation offloads (a NIC booted without a backend has
none, and TCP out of a clone was ~6x slower than out of a cold-booted VM). QEMU refuses
to restore those features onto a NIC whose backend lacks them, so every NIC of a clone
has a tap too: the first ones the sandbox's own (on its command line; the backend is not
part of the device state), the others spare ones (PrivateTaps again). A pooled clone is
restored on spare taps; the pool moves them into its lessee's namespace
(hull.runtime.pool). The guest devices keep the template's MACs (template_mac), and
configure_network gives them the veths' (agentapi.network.Interface.device_mac). Unused
devices stay down.

Sizes: the template key holds vCPUs and memory, so a sandbox sized from its limits or
its pod's annotations needs a template of its size. With the factory enabled, memory is
rounded up to a size class (memory_class: the next power of two),
so a few templates serve every size; each is built in the background the first time a
sandbox of its size misses it (hull.runtime.rebuild). A larger guest costs little more:
the pages it never touches are never allocated, the rest are the template's, shared.

Files (one directory per key, ``<template_dir>/<key id>/``): ``manifest.json``,
``state`` (device state), ``ram`` (guest RAM), ``empty/``, ``console.log``. A rebuild
writes a new directory and renames it into place: the RAM file clones map is never
written again, only unlinked (a clone's private mapping keeps the old pages alive).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hull.config.settings import Config
from hull.errors import HullError
from hull.hypervisor.base import Nic, Share, VMConfig
from hull.hypervisor.qemu.machine import QemuVM, resolve_binary
from hull.network.host import PrivateTaps
from hull.runtime.sharedfs import SHARE_TAG, mounts_under

log = logging.getLogger("hull.factory")
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
MANIFEST = "manifest.json"
#: 3: the NICs are booted with vnet-header taps (checksum and TSO offloads negotiated)
#: 4: the template's guest zeroes the pages it frees (TEMPLATE_PARAMS), and the zero pages
#: of its RAM file are punched out
#: 5: microvm with one IO-APIC, virtio-serial with 2 ports, one 9p device (the shared one)
FORMAT = 5
#: Kernel parameters of a template's guest, beyond the sandbox's own. ``init_on_free=1``:
#: the guest zeroes pages as it frees them and so does not zero them again when it hands
#: them out; a page a clone allocates and fills only in part then stays the template's,
#: instead of becoming the clone's private copy (docs/performance.md, host memory).
TEMPLATE_PARAMS = ("init_on_free=1",)
#: Virtio-net devices every template has (clones with more NICs boot cold).
TEMPLATE_NICS = 1
#: The spare NICs' host_mtu: the guest's maximum MTU (configure_network sets the veth's).
TEMPLATE_MTU = 65535
#: The 9p devices every template has: the shared directory, of pods and of CLI
#: containers alike (their rootfs and bind sources; hull.runtime.layout's pod layout).
TEMPLATE_TAGS = (SHARE_TAG,)
#: A QEMU migration stream starts with "QEVM".
STATE_MAGIC = b"QEVM"


class FactoryError(HullError):
    """A template cannot be built."""


class Unusable(Exception):
    """No template can serve this sandbox (the reason is the message): boot cold."""


def _stat_key(path: Path | str) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise Unusable(f"{path}: {exc.strerror}") from None
    return [str(path), st.st_size, st.st_mtime_ns]


def template_key(vm: VMConfig, qemu: str) -> dict[str, Any]:
    """What a template must match: everything that shapes the guest's memory and devices
    (not tsc_khz: it only steers the early boot calibration, already done)."""
    return {
        "format": FORMAT, "kernel": _stat_key(vm.kernel), "image": _stat_key(vm.initrd),
        "qemu": _stat_key(qemu), "machine_type": vm.machine_type, "accel": str(vm.accel),
        "vcpus": vm.vcpus, "memory_mib": vm.memory_mib,
        "kernel_params": list(vm.kernel_params), "tags": list(TEMPLATE_TAGS),
        "nics": TEMPLATE_NICS, "channel": str(vm.channel),
    }


#: Key fields that do not depend on the size: templates that differ in one of them were
#: made for other assets or another machine and are pruned when a template is built.
SIZE_FIELDS = ("vcpus", "memory_mib")


def memory_class(memory_mib: int) -> int:
    """The size class of ``memory_mib``: the next power of two (256 MiB stays 256, a pod
    of 256 + 128 MiB gets 512)."""
    return 1 << max(memory_mib - 1, 1).bit_length()


def template_mac(index: int) -> str:
    """The MAC of a template's NIC ``index`` (locally administered, "hull")."""
    return f"02:68:75:6c:6c:{index:02x}"


def spare_nics(taps: Sequence[int]) -> tuple[Nic, ...]:
    """NICs of the template's (MAC, MTU), the first ``len(taps)`` of them, backed by
    ``taps`` (hull.network.host.PrivateTaps, or a sandbox's own)."""
    return tuple(Nic(template_mac(i), fd, TEMPLATE_MTU) for i, fd in enumerate(taps))


def device_macs(count: int) -> tuple[str, ...]:
    """The MACs a clone's first ``count`` NICs have (the template's: configure_network
    gives them the veths')."""
    return tuple(template_mac(i) for i in range(count))


def key_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Template:
    path: Path
    manifest: dict[str, Any]

    @property
    def state(self) -> Path:
        return self.path / "state"

    @property
    def ram(self) -> Path:
        return self.path / "ram"

    @property
    def empty(self) -> Path:
        return self.path / "empty"


def root(config: Config) -> Path:
    return Path(config.factory.template_dir)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check(template: Template, key: dict[str, Any] | None = None) -> None:
    """Unusable unless the template's files are whole and match its manifest (and ``key``).

    The device state is small (~60 KB): it is hashed on every use. The RAM file is too
    big for that: its size and inode must match, which catches truncation and a file
    replaced behind Hull's back."""
    m = template.manifest
    if m.get("format") != FORMAT:
        raise Unusable(f"template {template.path}: unknown format {m.get('format')!r}")
    if key is not None and m.get("key") != key:
        raise Unusable(f"template {template.path} was made for another configuration")
    try:
        with open(template.state, "rb") as f:
            if f.read(4) != STATE_MAGIC:
                raise Unusable(f"template {template.state} is not a QEMU state file")
        if _sha256(template.state) != m.get("state_sha256"):
            raise Unusable(f"template {template.state} is corrupt (checksum mismatch)")
        st = os.stat(template.ram)
    except OSError as exc:
        raise Unusable(f"template {template.path}: {exc.strerror}: "
                       f"{exc.filename}") from None
    if st.st_size != m.get("ram_size") or st.st_ino != m.get("ram_ino"):
        raise Unusable(f"template {template.ram} was truncated or replaced "
                       f"(size {st.st_size}, expected {m.get('ram_size')})")
    if not template.empty.is_dir():
        raise Unusable(f"template {template.path}: empty/ is missing")


def load(path: Path) -> Template:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise Unusable(f"no template in {path}") from None
    except (OSError, ValueError) as exc:
        raise Unusable(f"template {path}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict):
        raise Unusable(f"template {path}: the manifest is not an object")
    return Template(path, manifest)


def find(config: Config, vm: VMConfig) -> Template:
    """The valid template for ``vm``, or Unusable with the reason."""
    key = template_key(vm, vm_binary(config))
    template = load(root(config) / key_id(key))
    check(template, key)
    return template


def current_key(config: Config) -> dict[str, Any]:
    """The key of the template a sandbox of ``config``'s default size needs."""
    from hull.runtime.sandbox import Sandbox

    vm = Sandbox(config, "template", Path(os.devnull)).vm_config()
    return template_key(vm, vm_binary(config))


def vm_binary(config: Config) -> str:
    return resolve_binary(config.hypervisor.path)


def spare_taps_needed(vm: VMConfig) -> int:
    """How many spare taps a clone for ``vm`` needs (its NICs beyond the sandbox's);
    Unusable when the sandbox has more NICs than the template."""
    if len(vm.nics) > TEMPLATE_NICS:
        raise Unusable(f"the sandbox has {len(vm.nics)} network interfaces (templates "
                       f"have {TEMPLATE_NICS})")
    return TEMPLATE_NICS - len(vm.nics)


def clone_config(vm: VMConfig, template: Template, state_fd: int,
                 spare_taps: Sequence[int]) -> VMConfig:
    """``vm`` as a clone of ``template``: the template's devices, each 9p device exported
    from this sandbox's directory of the same tag, the first NICs backed by the sandbox's
    taps, the others by ``spare_taps`` (spare_taps_needed of them: every NIC of a clone
    needs a vnet-header backend, see PrivateTaps). Unusable when ``vm`` needs devices the
    template lacks (more NICs, a share of another tag)."""
    if len(spare_taps) != spare_taps_needed(vm):
        raise ValueError(f"{len(spare_taps)} spare taps for {len(vm.nics)} of "
                         f"{TEMPLATE_NICS} NICs")
    nics = spare_nics([*(nic.tap_fd for nic in vm.nics), *spare_taps])
    by_tag = {share.tag: share for share in vm.shares}
    if len(by_tag) != len(vm.shares) or set(by_tag) - set(TEMPLATE_TAGS):
        raise Unusable(f"the sandbox's shares {sorted(by_tag)} are not the template's")
    shares = tuple(by_tag.get(tag, Share(tag, template.empty, readonly=True))
                   for tag in TEMPLATE_TAGS)
    return dataclasses.replace(vm, shares=shares, memory_file=template.ram,
                               memory_shared=False, incoming_fd=state_fd, nics=nics,
                               kernel_params=(*vm.kernel_params, *TEMPLATE_PARAMS))


def template_config(vm: VMConfig, path: Path, taps: Sequence[int]) -> VMConfig:
    """The template VM: fixed devices, its RAM in ``path``, its NICs on ``taps``
    (TEMPLATE_NICS of them, PrivateTaps)."""
    empty = path / "empty"
    return dataclasses.replace(
        vm, shares=tuple(Share(tag, empty, readonly=True) for tag in TEMPLATE_TAGS),
        memory_file=path / "ram", memory_shared=True, incoming_fd=-1,
        nics=spare_nics(taps), netns_fd=-1, console_log=path / "console.log",
        kernel_params=(*vm.kernel_params, *TEMPLATE_PARAMS))


def punch_zero_pages(path: Path, page: int = 4096, chunk: int = 2 << 20) -> int:
    """Deallocate the pages of ``path`` that hold only zeros (fallocate PUNCH_HOLE, the
    size kept); the bytes freed. A template guest that zeroes what it frees leaves most
    of its RAM file zero: the holes read back as zeros, and take no memory."""
    zero_chunk, zero_page = bytes(chunk), bytes(page)
    libc = ctypes.CDLL(None, use_errno=True)
    freed = 0
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        offset = 0
        while data := os.pread(fd, chunk, offset):
            view = memoryview(data)
            if data == zero_chunk:
                runs = [(0, len(data))]
            else:
                runs = []
                for start in range(0, len(data), page):
                    if view[start:start + page] == zero_page:
                        if runs and runs[-1][0] + runs[-1][1] == start:
                            runs[-1] = (runs[-1][0], runs[-1][1] + page)
                        else:
                            runs.append((start, page))
            for start, length in runs:
                _punch(libc, fd, offset + start, length)
                freed += length
            offset += len(data)
    finally:
        os.close(fd)
    return freed


def _punch(libc: ctypes.CDLL, fd: int, offset: int, length: int) -> None:
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_int64(offset),
                      ctypes.c_int64(length)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


async def build(config: Config) -> Template:
    """Boot a template VM for the current configuration and save it (replacing the old)."""
    from hull.runtime.sandbox import Sandbox

    base = root(config)
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    work = base / f".build-{secrets.token_hex(4)}"
    work.mkdir(mode=0o700)
    (work / "empty").mkdir(mode=0o500)
    try:
        sandbox = Sandbox(config, f"template-{work.name[7:]}", work / "console.log")
        vm = sandbox.vm_config()
        key = template_key(vm, vm_binary(config))
        final = base / key_id(key)
        # The template's NICs are booted on taps: the guest then uses offloads (PrivateTaps).
        # They are closed after QEMU stopped (the inner block's end).
        with PrivateTaps(TEMPLATE_NICS) as taps:
            sandbox.template_config = template_config(vm, work, taps.fds)
            started = time.monotonic()
            async with sandbox:
                booted = time.monotonic() - started
                assert isinstance(sandbox.vm, QemuVM)
                fd = os.open(work / "state",
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    await sandbox.vm.save_state(fd)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                version = await sandbox.vm.query("query-version")
                # The template is paused now: stop it without asking the agent to shut down.
                if sandbox.channel is not None:
                    await sandbox.channel.close()
                    sandbox.channel = None
        punched = punch_zero_pages(work / "ram")
        st = os.stat(work / "ram")
        log.debug("template %s: %d MiB of zero pages punched out, %d MiB of RAM kept",
                  final.name, punched >> 20, (st.st_blocks * 512) >> 20)
        manifest = {
            "format": FORMAT, "key": key, "created": time.time(), "boot_seconds": booted,
            "state_sha256": _sha256(work / "state"), "ram_size": st.st_size,
            "ram_ino": st.st_ino, "qemu_version": version.get("qemu", {}),
            "kernel_release": sandbox.hello.kernel_release if sandbox.hello else "",
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    for stale in prune(config, key):
        log.info("removed vm template %s: made for other assets or another machine", stale)
    return Template(final, manifest)


def prune(config: Config, key: dict[str, Any]) -> list[Path]:
    """Remove the templates that differ from ``key`` in more than their size (another
    kernel, image, QEMU, machine type ...: never usable again) and the unreadable ones.
    Running clones are not disturbed. Returns what was removed."""
    removed = []
    same = {k: v for k, v in key.items() if k not in SIZE_FIELDS}
    for path, template, _ in templates(config):
        other = template.manifest.get("key") if template else None
        if isinstance(other, dict) and {
                k: v for k, v in other.items() if k not in SIZE_FIELDS} == same:
            continue
        if path.name == key_id(key):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _replace(new: Path, final: Path) -> None:
    """Move ``new`` to ``final``; an old template there is renamed away, then removed
    (running clones keep their RAM: their mapping holds the unlinked file)."""
    if final.exists():
        old = final.with_name(f".old-{secrets.token_hex(4)}")
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    new.rename(final)


def templates(config: Config) -> list[tuple[Path, Template | None, str]]:
    """Every template directory: (path, template or None, "ok" or why it is unusable)."""
    out: list[tuple[Path, Template | None, str]] = []
    base = root(config)
    if not base.is_dir():
        return out
    for path in sorted(base.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue  # the pool's socket, lock files
        try:
            template = load(path)
            check(template)
        except Unusable as exc:
            out.append((path, None, str(exc)))
        else:
            out.append((path, template, "ok"))
    return out


def destroy(config: Config) -> int:
    """Remove every template (running clones are not disturbed); how many were removed."""
    base = root(config)
    if not base.is_dir():
        return 0
    count = 0
    for path in base.iterdir():
        if path.is_dir() and not path.is_symlink():
            if mounts_under(path):
                # a pooled clone's share, bound by a sandbox that still runs
                log.warning("%s has mounts (a leased pooled clone): left in place", path)
                continue
            shutil.rmtree(path, ignore_errors=True)
            count += not path.name.startswith(".")
        else:
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        base.rmdir()
    return count
