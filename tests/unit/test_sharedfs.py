"""Host staging of bind mounts for the VM's share (hull.runtime.sharedfs)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from hull.agentapi import schema
from hull.runtime import sharedfs
from hull.runtime.state import ContainerDir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def mount_options(point: Path) -> set[str]:
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if fields[4] == str(point):
                return set(fields[5].split(","))
    raise AssertionError(f"{point} is not mounted")


def binds(*mounts: tuple[str, str, list[str]]) -> dict[str, Any]:
    return {"mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}] + [
        {"destination": d, "type": "bind", "source": s, "options": o} for d, s, o in mounts]}


@pytest.fixture
def host(tmp_path: Path) -> Path:
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "f").write_text("x")
    (tmp_path / "hosts").write_text("127.0.0.1 h\n")
    (tmp_path / "state").mkdir()
    return tmp_path


def test_stage_rewrites_sources_and_mounts_nosuid_nodev(host: Path) -> None:
    staging = host / "state" / "shared"
    spec = binds(("/data", str(host / "vol"), ["rbind", "rw"]),
                 ("/ro", "vol", ["rbind", "ro"]),  # relative: to the bundle
                 ("/etc/hosts", str(host / "hosts"), ["bind", "ro", "rw"]),
                 ("/dev/null", "/dev/null", ["bind"]))
    try:
        guest = sharedfs.stage(spec, host, staging, "c1")
        sources = [m["source"] for m in guest["mounts"]]
        assert sources == ["proc", *(f"{schema.SHARE_SOURCE_PREFIX}hullshared/c1/mounts/{i}"
                                     for i in (1, 2, 3)), "/dev/null"]
        assert sharedfs.guest_spec(spec, staging, "c1") == guest
        assert spec["mounts"][1]["source"] == str(host / "vol")  # the input is unchanged
        rw, ro, hosts = (staging / "c1" / "mounts" / str(i) for i in (1, 2, 3))
        assert {"nosuid", "nodev", "rw"} <= mount_options(rw)
        assert {"nosuid", "nodev", "ro"} <= mount_options(ro)
        assert "rw" in mount_options(hosts)  # the last of ro/rw counts
        (rw / "new").write_text("y")
        assert (host / "vol" / "new").read_text() == "y"
        with pytest.raises(OSError) as exc:
            (ro / "other").write_text("y")
        assert exc.value.errno == errno.EROFS
        assert (hosts).read_text() == "127.0.0.1 h\n"
        assert sharedfs.shares(staging)[0].tag == sharedfs.SHARE_TAG
    finally:
        sharedfs.release(staging)
    assert not staging.exists() and sharedfs.mounts_under(host) == []
    assert sorted(os.listdir(host / "vol")) == ["f", "new"]


def test_missing_source_names_the_mount_and_leaves_nothing(host: Path) -> None:
    staging = host / "state" / "shared"
    spec = binds(("/data", str(host / "vol"), ["rbind"]), ("/gone", "/nonexistent", ["bind"]))
    with pytest.raises(sharedfs.ShareError, match="mount /gone: bind source /nonexistent"):
        sharedfs.stage(spec, host, staging, "c1")
    assert sharedfs.mounts_under(host) == []
    assert not (staging / "c1").exists()


def test_no_binds_no_share(host: Path) -> None:
    staging = host / "state" / "shared"
    spec = binds()
    assert sharedfs.stage(spec, host, staging, "c1") is spec
    assert sharedfs.shares(staging) == ()


def test_a_symlink_planted_in_the_staging_directory_is_not_followed(host: Path) -> None:
    # A pod's share root is writable by the guest: it may plant <cid> -> anywhere.
    staging = host / "state" / "shared"
    staging.mkdir()
    target = host / "elsewhere"
    target.mkdir()
    (staging / "c2").symlink_to(target)
    with pytest.raises(sharedfs.ShareError, match="mount /data"):
        sharedfs.stage(binds(("/data", str(host / "vol"), ["rbind"])), host, staging, "c2")
    assert sharedfs.mounts_under(host) == [] and os.listdir(target) == []
    sharedfs.release(staging)


def test_container_dir_remove_unmounts_first(host: Path) -> None:
    # A crashed `hull` left its staged binds: removing the state must not delete the
    # host's files through them.
    cdir = ContainerDir(host / "state", "c1")
    cdir.create()
    sharedfs.stage(binds(("/data", str(host / "vol"), ["rbind"])), host, cdir.path / "shared",
                   "c1")
    cdir.remove()
    assert not cdir.path.exists() and sharedfs.mounts_under(host) == []
    assert (host / "vol" / "f").read_text() == "x"
