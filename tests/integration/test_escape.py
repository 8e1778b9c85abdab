"""Escape attempts from a root process in the guest (issue 5 item 7, issue 8 item 4).

The container's root has every capability of its VM. Through the 9p shares it must reach
nothing of the host but the paths named (hull.runtime.sharedfs): not through "..", not
through absolute, relative or swapped symlinks (the guest resolves them in its own view),
not through device nodes or hard links, and it cannot write to a read-only bind even
after remounting it read-write in the guest (the host's bind is read-only). A fork bomb
and memory exhaustion in one VM leave the host and a neighbouring VM responsive.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import HULL, BundleFactory, Runner


@pytest.fixture
def host(tmp_path: Path) -> dict[str, Any]:
    """A secret outside the shares, a rw and a ro volume."""
    token = secrets.token_hex(16)
    _TOKENS[:] = [token]
    (tmp_path / "secret").write_text(token + "\n")
    (tmp_path / "secretdir").mkdir()
    (tmp_path / "secretdir" / "secret").write_text(token + "\n")
    for name in ("vol", "rovol"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text(f"{name} file\n")
    return {"token": token, "dir": tmp_path, "vol": tmp_path / "vol",
            "rovol": tmp_path / "rovol"}


def with_volumes(h: dict[str, Any], extra: Any = None) -> Any:
    def mutate(spec: dict[str, Any]) -> None:
        spec["mounts"] += [
            {"destination": "/vol", "type": "bind", "source": str(h["vol"]),
             "options": ["rbind", "rw"]},
            {"destination": "/rovol", "type": "bind", "source": str(h["rovol"]),
             "options": ["rbind", "ro"]}]
        if extra:
            extra(spec)

    return mutate


def run(hull: Runner, b: Path, cid: str = "esc") -> str:
    """The container's stdout (its stderr goes to the test's report on failure)."""
    done = hull("run", "-b", str(b), cid, timeout=180)
    assert done.returncode == 0, done.stderr.decode()
    assert host_token_free(done.stderr.decode()), done.stderr
    return done.stdout.decode()


_TOKENS: list[str] = []


def host_token_free(text: str) -> bool:
    return not any(t in text for t in _TOKENS)


def test_dotdot_and_symlinks_resolve_in_the_guest(hull: Runner, bundle: BundleFactory,
                                                  host: dict[str, Any]) -> None:
    d, vol = host["dir"], host["vol"]
    # Planted by the host before the mount: they point at host files.
    (vol / "shadow").symlink_to("/etc/shadow")
    (vol / "abs").symlink_to(d / "secret")
    (vol / "rel").symlink_to("../secret")
    (vol / "reldir").symlink_to("../secretdir")
    script = "; ".join([
        f"cat /vol/../secret /vol/../../../..{d}/secret /rovol/../secret",
        "cat /vol/shadow", "cat /vol/abs /vol/rel /vol/reldir/secret",
        # made by the guest: absolute and relative links to the host's paths
        f"ln -s {d}/secret /vol/gabs", "ln -s ../../../../../..{d}/secret /vol/grel",
        "cat /vol/gabs /vol/grel",
        "echo done"])
    b = bundle(["sh", "-c", script], mutate=with_volumes(host))
    (b / "rootfs/etc/shadow").write_text("guest-shadow\n")
    out = run(hull, b)
    assert host["token"] not in out, out
    assert "guest-shadow" in out  # /vol/shadow -> the container's own /etc/shadow
    host_shadow = Path("/etc/shadow").read_text().splitlines()[0]
    assert host_shadow not in out
    assert out.rstrip().endswith("done"), out


def test_symlink_swapped_after_the_mount(hull: Runner, bundle: BundleFactory,
                                         host: dict[str, Any], state_root: Path) -> None:
    d, vol = host["dir"], host["vol"]
    (vol / "swap").write_text("benign\n")
    (vol / "swapdir").mkdir()
    (vol / "swapdir" / "secret").write_text("benign too\n")
    script = ("cat /vol/swap /vol/swapdir/secret; touch /vol/ready; i=0; "
              "while [ ! -e /vol/go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; "
              "cat /vol/swap /vol/swapdir/secret; ls -l /vol/swap; echo done")
    b = bundle(["sh", "-c", script], mutate=with_volumes(host))
    proc = subprocess.Popen([*HULL, "--root", str(state_root), "run", "-b", str(b), "swp"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (vol / "ready").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "container not ready"
            time.sleep(0.1)
        tmp = vol / "swap.new"
        tmp.symlink_to(d / "secret")
        tmp.replace(vol / "swap")
        (vol / "swapdir" / "secret").unlink()
        (vol / "swapdir").rmdir()
        (vol / "swapdir").symlink_to(d / "secretdir")
        (vol / "go").touch()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text
    assert text.startswith("benign\nbenign too\n"), text
    assert host["token"] not in text, text
    assert text.rstrip().endswith("done")


def test_device_nodes_reach_guest_devices_only(hull: Runner, bundle: BundleFactory,
                                               host: dict[str, Any]) -> None:
    # The host's root disk: no such device in the VM (it boots from an initramfs).
    dev = os.stat("/").st_dev
    major, minor = os.major(dev), os.minor(dev)
    script = (f"mknod /vol/disk b {major} {minor} && echo made; "
              "head -c 16 /vol/disk >/dev/null 2>&1 && echo READ-HOST-DISK || echo no-disk; "
              "mknod /vol/null c 1 3 && echo hi > /vol/null && echo null-ok; echo done")
    b = bundle(["sh", "-c", script], mutate=with_volumes(host))
    out = run(hull, b)
    assert "READ-HOST-DISK" not in out, out
    assert "no-disk" in out and out.rstrip().endswith("done"), out
    # Whether mknod works through the share or not, no device node is on the host.
    for path in host["vol"].iterdir():
        mode = path.lstat().st_mode
        assert not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)), f"{path} is a device on the host"


def test_hard_links_cannot_leave_a_share(hull: Runner, bundle: BundleFactory,
                                         host: dict[str, Any]) -> None:
    d = host["dir"]
    script = "; ".join([
        "ln /etc/passwd /vol/hl1 2>/dev/null && echo LINKED-ROOTFS || echo refused1",
        "ln /rovol/file /vol/hl2 2>/dev/null && echo LINKED-RO || echo refused2",
        f"ln /vol/../../../..{d}/secret /vol/hl3 2>/dev/null && echo LINKED-SECRET "
        "|| echo refused3",
        "ln /vol/file /vol/hl4 && echo same-share-ok", "echo done"])
    b = bundle(["sh", "-c", script], mutate=with_volumes(host))
    out = run(hull, b)
    assert "refused1" in out and "refused2" in out and "refused3" in out, out
    assert "LINKED" not in out and "same-share-ok" in out, out
    assert sorted(p.name for p in host["vol"].iterdir()) == ["file", "hl4"]
    assert (d / "secret").stat().st_nlink == 1


def test_read_only_share_stays_read_only_on_the_host(hull: Runner, bundle: BundleFactory,
                                                     host: dict[str, Any]) -> None:
    # The guest's root can remount its view read-write: the host's bind is read-only all
    # the same. (Mounting the 9p share a second time is refused: EBUSY.)
    script = "; ".join([
        "mount -o remount,rw,bind /rovol && echo remounted",
        "(echo x > /rovol/new) 2>/dev/null && echo WROTE || echo refused",
        "(echo x > /rovol/file) 2>/dev/null && echo WROTE || echo refused",
        "echo done"])
    b = bundle(["sh", "-c", script], mutate=with_volumes(host))
    out = run(hull, b)
    assert "WROTE" not in out and out.count("refused") == 2, out
    assert out.startswith("remounted\n"), out
    assert sorted(os.listdir(host["rovol"])) == ["file"]
    assert (host["rovol"] / "file").read_text() == "rovol file\n"


def test_fork_bomb_and_memory_exhaustion_leave_host_and_neighbour_responsive(
        state_root: Path, bundle: BundleFactory, hull: Runner, tmp_path: Path) -> None:
    def pids_limit(spec: dict[str, Any]) -> None:
        spec.setdefault("linux", {})["resources"] = {"pids": {"limit": 128}}

    # The bomb's shell spins (no fork needed) until timeout kills it; PID 1 then kills
    # what is left with a builtin, so the container always ends, pids limit or not.
    bomb = ("timeout -s KILL 15 sh -c 'f() { f | f & }; f; while :; do :; done' "
            "2>/dev/null; kill -9 -1 2>/dev/null; echo bomb-over")
    hog = "awk 'BEGIN { s = \"x\"; while (1) s = s s }'; echo hog-status $?"
    procs = {}
    for name, script, mutate in (("bomb", bomb, pids_limit), ("hog", hog, None)):
        b = bundle(["sh", "-c", script], mutate=mutate)
        # each run gets its own bundle directory: the fixture reuses one per test
        own = tmp_path / f"b-{name}"
        os.rename(b, own)
        procs[name] = subprocess.Popen(
            [*HULL, "--root", str(state_root), "run", "-b", str(own), name],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(8)  # both attacks under way
        started = time.monotonic()
        subprocess.run(["true"], check=True, timeout=5)
        assert time.monotonic() - started < 2, "the host did not answer"
        neighbour = bundle(["sh", "-c", "echo alive"])
        started = time.monotonic()
        done = hull("run", "-b", str(neighbour), "neighbour", timeout=120)
        took = time.monotonic() - started
        assert done.returncode == 0 and done.stdout == b"alive\n", done.stderr
        assert took < 60, f"a neighbouring sandbox took {took:.1f}s"
        outs = {name: p.communicate(timeout=150)[0].decode() for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "bomb-over" in outs["bomb"], outs["bomb"]
    assert "hog-status 137" in outs["hog"] or procs["hog"].returncode == 137, outs["hog"]
