"""VM templates: `hull run` through a clone, clones that are not twins, bad templates."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import HULL, BundleFactory, Runner

COLD = b"booting cold"
PROBE = ("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
         "cat /proc/sys/kernel/random/uuid; date +%s; hostname")


def factory_config(path: Path, template_dir: Path) -> Path:
    path.write_text(f'[factory]\nenabled = true\ntemplate_dir = "{template_dir}"\n')
    return path


@pytest.fixture
def templated(tmp_path: Path, hull: Runner) -> Iterator[Path]:
    """A configuration file whose factory has a fresh template (in its own tmpfs dir)."""
    template_dir = Path("/dev/shm") / f"hull-test-{uuid.uuid4().hex[:12]}"
    config = factory_config(tmp_path / "factory.toml", template_dir)
    try:
        done = hull("--config", str(config), "factory", "init")
        assert done.returncode == 0, done.stderr
        yield config
    finally:
        shutil.rmtree(template_dir, ignore_errors=True)


def only_template(config: Path) -> Path:
    template_dir = Path(config.read_text().split('template_dir = "')[1].split('"')[0])
    (found,) = [p for p in template_dir.iterdir() if not p.name.startswith(".")]
    return found


def probe(hull: Runner, config: Path, bundle: BundleFactory, name: str
          ) -> tuple[list[str], bytes, float]:
    started = time.monotonic()
    done = hull("--config", str(config), "run", "-b", str(bundle(["sh", "-c", PROBE])), name)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().split(), done.stderr, took


def test_clones_are_not_twins(hull: Runner, bundle: BundleFactory, templated: Path) -> None:
    first, err1, _ = probe(hull, templated, bundle, "twin1")
    second, err2, _ = probe(hull, templated, bundle, "twin2")
    assert COLD not in err1 + err2, err1 + err2
    assert first[0] != second[0], "two clones read the same bytes from /dev/urandom"
    assert first[1] != second[1], "two clones made the same UUID"
    for out in (first, second):
        assert len(out[0]) == 64 and uuid.UUID(out[1])
        assert abs(int(out[2]) - time.time()) < 30, "the clone's wall clock was not set"
        assert out[3] == "hulltest"


def test_run_through_a_template(hull: Runner, bundle: BundleFactory, templated: Path,
                                tmp_path: Path) -> None:
    cold_config = tmp_path / "cold.toml"
    cold_config.write_text("[factory]\nenabled = false\n")
    _, _, cold = probe(hull, cold_config, bundle, "cold")
    _, err, warm = probe(hull, templated, bundle, "warm")
    assert COLD not in err, err
    done = hull("--config", str(templated), "run", "-b",
                str(bundle(["sh", "-c", "cat /etc/passwd; echo hi > /tmp/x; cat /tmp/x"])),
                "rootfs")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"root:x:0:0") and done.stdout.endswith(b"hi\n")
    print(f"\nhull run: cold {cold:.2f}s, from a template {warm:.2f}s")


def rewrite_manifest(template: Path, **changes: object) -> None:
    manifest = json.loads((template / "manifest.json").read_text())
    manifest.update(changes)
    (template / "manifest.json").write_text(json.dumps(manifest))


def test_bad_templates_fall_back_to_a_cold_boot(hull: Runner, bundle: BundleFactory,
                                                templated: Path) -> None:
    template = only_template(templated)
    state = (template / "state").read_bytes()
    # 1. a flipped bit in the device state: caught by its checksum
    (template / "state").write_bytes(state[:1000] + bytes([state[1000] ^ 1]) + state[1001:])
    out, err, _ = probe(hull, templated, bundle, "corrupt")
    assert b"corrupt" in err and COLD in err, err
    # 2. a truncated device state whose manifest was made to match: QEMU refuses it, Hull
    #    gives up on the clone within factory.restore_timeout and boots cold
    short = state[: len(state) // 2]
    (template / "state").write_bytes(short)
    rewrite_manifest(template, state_sha256=hashlib.sha256(short).hexdigest())
    out, err, _ = probe(hull, templated, bundle, "truncated")
    assert b"did not restore" in err and COLD in err, err
    assert len(out) == 4
    # 3. a template made for another configuration
    (template / "state").write_bytes(state)
    rewrite_manifest(template, state_sha256=hashlib.sha256(state).hexdigest(),
                     key={"format": 1, "memory_mib": 1})
    _, err, _ = probe(hull, templated, bundle, "mismatch")
    assert b"another configuration" in err and COLD in err, err
    # 4. a truncated RAM file
    rewrite_manifest(template, key=json.loads(
        (template / "manifest.json").read_text())["key"])
    os.truncate(template / "ram", 4096)
    _, err, _ = probe(hull, templated, bundle, "shortram")
    assert COLD in err, err
    status = hull("--config", str(templated), "factory", "status")
    assert status.returncode == 1 and b"truncated" in status.stdout


def test_deleting_the_template_does_not_disturb_running_clones(
        hull: Runner, bundle: BundleFactory, templated: Path, state_root: Path) -> None:
    script = "echo up; read x; head -c 8 /dev/urandom | od -An -tx1; echo alive"
    proc = subprocess.Popen([*HULL, "--root", str(state_root), "--config", str(templated),
                             "run", "-b", str(bundle(["sh", "-c", script])), "survivor"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline() == b"up\n"
        done = hull("--config", str(templated), "factory", "destroy")
        assert done.returncode == 0 and b"removed 1" in done.stdout, done
        out, err = proc.communicate(b"go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.endswith(b"alive\n") and COLD not in err
