"""VM templates (hull.runtime.factory): command lines, clone devices, template checks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest

from hull.config import settings
from hull.errors import ConfigError
from hull.hypervisor.base import Nic, Share
from hull.hypervisor.qemu import argv
from hull.runtime import factory, layout, sharedfs
from hull.shim.v2 import pod
from tests.unit.test_qemu_argv import config as vm
from tests.unit.test_qemu_argv import opt


def test_template_tags_are_the_runtime_s() -> None:
    # One 9p device: CLI containers of an enabled factory use the pod layout too.
    assert factory.TEMPLATE_TAGS == (sharedfs.SHARE_TAG,)
    assert pod.SHARE_TAG == sharedfs.SHARE_TAG


def test_no_memory_file_no_template_args() -> None:
    args = argv.build("q", vm(), argv.Fds(3, 4))
    assert "memory-backend" not in " ".join(args) and "-incoming" not in args


def test_template_argv_maps_ram_shared() -> None:
    args = argv.build("q", vm(memory_file=Path("/dev/shm/t/ram"), memory_shared=True,
                              memory_mib=256), argv.Fds(3, 4))
    assert opt(args, "-machine")[0].endswith(",memory-backend=mem")
    assert ("memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/t/ram,share=on"
            in opt(args, "-object"))
    assert "migration.store-global-state=off" in opt(args, "-global")
    assert "-incoming" not in args


def test_clone_argv_maps_ram_private_and_defers_incoming() -> None:
    args = argv.build("q", vm(memory_file=Path("/dev/shm/t/ram"), incoming_fd=9),
                      argv.Fds(3, 4))
    assert any(o.endswith("share=off") for o in opt(args, "-object"))
    assert opt(args, "-incoming") == ["defer"]


def template(tmp_path: Path) -> factory.Template:
    (tmp_path / "empty").mkdir()
    state = b"QEVM" + os.urandom(1000)
    (tmp_path / "state").write_bytes(state)
    (tmp_path / "ram").write_bytes(b"\0" * 4096)
    st = (tmp_path / "ram").stat()
    manifest = {"format": factory.FORMAT, "key": {"k": 1},
                "state_sha256": hashlib.sha256(state).hexdigest(),
                "ram_size": st.st_size, "ram_ino": st.st_ino}
    (tmp_path / factory.MANIFEST).write_text(json.dumps(manifest))
    return factory.load(tmp_path)


SPARES = tuple(range(20, 20 + factory.TEMPLATE_NICS))  # stand-ins for PrivateTaps' fds


def test_clone_config_points_the_template_devices_at_the_clone_dirs(tmp_path: Path) -> None:
    t = template(tmp_path)
    pod_share = Share("hullshared", Path("/pod/shared"))
    clone = factory.clone_config(vm(shares=(pod_share,)), t, 7, SPARES)
    assert clone.shares == (pod_share,)
    assert clone.memory_file == t.ram and not clone.memory_shared and clone.incoming_fd == 7
    # no share: the device exports the template's empty directory
    assert factory.clone_config(vm(), t, 7, SPARES).shares == (
        Share("hullshared", t.empty, readonly=True),)
    # a rootfs device of its own (no factory's layout): the template cannot serve it
    rootfs = Share(layout.ROOTFS_TAG, Path("/bundle/rootfs"), readonly=True)
    with pytest.raises(factory.Unusable, match="not the template's"):
        factory.clone_config(vm(shares=(rootfs, pod_share)), t, 7, SPARES)


def test_every_clone_nic_has_a_tap(tmp_path: Path) -> None:
    """The sandbox's taps first, spare taps for the rest: every NIC of a clone needs a
    vnet-header backend (the template's guest uses offloads)."""
    t = template(tmp_path)
    sandbox_nic = Nic("02:00:00:00:00:01", 5, 1400)
    assert factory.spare_taps_needed(vm(nics=(sandbox_nic,))) == factory.TEMPLATE_NICS - 1
    clone = factory.clone_config(vm(nics=(sandbox_nic,)), t, 7, SPARES[1:])
    assert clone.nics == factory.spare_nics((5, *SPARES[1:]))
    assert clone.nics[0] == Nic(factory.template_mac(0), 5, factory.TEMPLATE_MTU)
    args = argv.build("q", clone, argv.Fds(3, 4))
    assert opt(args, "-netdev")[0] == "tap,id=net0,fd=5"
    assert (f"virtio-net-device,netdev=net0,mac={factory.template_mac(0)},host_mtu=65535"
            in opt(args, "-device"))
    spare = factory.clone_config(vm(), t, 7, SPARES)
    assert opt(argv.build("q", spare, argv.Fds(3, 4)), "-netdev") == [
        f"tap,id=net{i},fd={fd}" for i, fd in enumerate(SPARES)]
    with pytest.raises(ValueError, match="spare taps"):
        factory.clone_config(vm(), t, 7, ())
    assert factory.device_macs(1) == (factory.template_mac(0),)


@pytest.mark.parametrize("kw", [{"nics": tuple(Nic(f"02:00:00:00:00:0{i}", 5 + i)
                                               for i in range(factory.TEMPLATE_NICS + 1))},
                                {"shares": (Share("other", Path("/x")),)}])
def test_clone_config_refuses_devices_templates_lack(tmp_path: Path, kw: dict[str, object]
                                                     ) -> None:
    with pytest.raises(factory.Unusable):
        spares = SPARES[:factory.spare_taps_needed(vm(**kw))]
        factory.clone_config(vm(**kw), template(tmp_path), 7, spares)


def test_templates_and_clones_boot_the_same_command_line(tmp_path: Path) -> None:
    """The template's guest zeroes what it frees (init_on_free=1); a clone's QEMU gets
    the template's kernel command line, not only its devices."""
    base = vm()
    made = factory.template_config(base, tmp_path, SPARES)
    clone = factory.clone_config(base, template(tmp_path), 7, SPARES)
    assert "init_on_free=1" in made.kernel_params
    assert made.kernel_params == clone.kernel_params == (*base.kernel_params,
                                                         *factory.TEMPLATE_PARAMS)
    assert opt(argv.build("q", made, argv.Fds(3, 4)), "-append") == opt(
        argv.build("q", clone, argv.Fds(3, 4)), "-append")


def test_zero_pages_are_punched_out_and_read_back_as_zeros() -> None:
    page = 4096
    content = bytearray(3 * (2 << 20))  # three chunks: zero, mixed, zero but one byte
    content[(2 << 20) + 5 * page + 7] = 1
    content[(2 << 20) + 9 * page] = 2
    content[-1] = 3
    path = Path("/dev/shm") / f"hull-test-punch-{os.getpid()}"  # tmpfs: holes are free
    try:
        path.write_bytes(bytes(content))
        before = os.stat(path).st_blocks * 512
        freed = factory.punch_zero_pages(path)
        assert freed == len(content) - 3 * page
        assert before - os.stat(path).st_blocks * 512 == freed
        assert path.read_bytes() == bytes(content) and os.stat(path).st_size == len(content)
    finally:
        path.unlink(missing_ok=True)


def test_template_config_has_fixed_devices(tmp_path: Path) -> None:
    cfg = factory.template_config(vm(nics=(Nic("02:00:00:00:00:01", 5),)), tmp_path, SPARES)
    assert [s.tag for s in cfg.shares] == list(factory.TEMPLATE_TAGS)
    assert cfg.nics == factory.spare_nics(SPARES)
    assert cfg.memory_shared and cfg.memory_file == tmp_path / "ram"
    args = argv.build("q", cfg, argv.Fds(3, 4))
    assert opt(args, "-netdev") == [f"tap,id=net{i},fd={fd}" for i, fd in enumerate(SPARES)]
    assert (f"virtio-net-device,netdev=net0,mac={factory.template_mac(0)},host_mtu=65535"
            in opt(args, "-device"))


def test_memory_classes() -> None:
    assert [factory.memory_class(m) for m in (64, 200, 256, 257, 384, 512, 1000, 1025)] == [
        64, 256, 256, 512, 512, 512, 1024, 2048]


def test_a_whole_template_passes(tmp_path: Path) -> None:
    factory.check(template(tmp_path), {"k": 1})


def test_corrupt_state_is_refused(tmp_path: Path) -> None:
    t = template(tmp_path)
    data = bytearray(t.state.read_bytes())
    data[100] ^= 0xFF
    t.state.write_bytes(bytes(data))
    with pytest.raises(factory.Unusable, match="corrupt"):
        factory.check(t)


def test_truncated_files_are_refused(tmp_path: Path) -> None:
    t = template(tmp_path)
    os.truncate(t.ram, 1024)
    with pytest.raises(factory.Unusable, match="truncated"):
        factory.check(t)
    (tmp_path / "2").mkdir()
    t = template(tmp_path / "2")
    t.state.write_bytes(b"QE")
    with pytest.raises(factory.Unusable, match="not a QEMU state"):
        factory.check(t)


def test_mismatched_or_missing_template_is_refused(tmp_path: Path) -> None:
    t = template(tmp_path)
    with pytest.raises(factory.Unusable, match="another configuration"):
        factory.check(t, {"k": 2})
    (tmp_path / factory.MANIFEST).write_text("{not json")
    with pytest.raises(factory.Unusable, match="manifest"):
        factory.load(tmp_path)
    with pytest.raises(factory.Unusable, match="no template"):
        factory.load(tmp_path / "none")


def test_key_follows_kernel_memory_and_machine(tmp_path: Path) -> None:
    for name in ("vmlinux", "initrd", "qemu"):
        (tmp_path / name).write_bytes(b"x")
    base = vm(kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd")
    qemu = str(tmp_path / "qemu")
    key = factory.key_id(factory.template_key(base, qemu))
    assert key == factory.key_id(factory.template_key(dataclasses.replace(base, tsc_khz=5),
                                                      qemu))
    for change in ({"memory_mib": 512}, {"machine_type": "q35"}, {"vcpus": 2},
                   {"kernel_params": ("x=1",)}):
        other = dataclasses.replace(base, **change)  # type: ignore[arg-type]
        assert factory.key_id(factory.template_key(other, qemu)) != key, change
    (tmp_path / "vmlinux").write_bytes(b"xy")
    assert factory.key_id(factory.template_key(base, qemu)) != key


def test_factory_config_defaults_off_and_checks(tmp_path: Path) -> None:
    config = settings.Config()
    assert config.factory.enabled is False and config.factory.pool_size == 0
    bad = tmp_path / "c.toml"
    bad.write_text('[factory]\ntemplate_dir = "relative"\n')
    with pytest.raises(ConfigError, match="template_dir"):
        settings.load(bad)
    bad.write_text(f"[factory]\npool_size = {settings.MAX_POOL + 1}\n")
    with pytest.raises(ConfigError, match="pool_size"):
        settings.load(bad)
    assert config.factory.auto_rebuild is True


def test_status_lists_template_directories_only(tmp_path: Path) -> None:
    config = settings.Config()
    config.factory.template_dir = str(tmp_path)
    (tmp_path / "t1").mkdir()
    template(tmp_path / "t1")
    (tmp_path / "pool.sock").write_bytes(b"")  # the pool daemon's socket, its lock
    (tmp_path / "pool.lock").write_bytes(b"")
    (tmp_path / "broken").mkdir()
    listed = {path.name: why for path, _, why in factory.templates(config)}
    assert listed.keys() == {"t1", "broken"}
    assert listed["t1"] == "ok"
