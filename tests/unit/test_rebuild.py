"""Background template builds (hull.runtime.rebuild): one builder per key, a pause after a
failure, the requester's configuration handed over whole; pruning of stale templates."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from hull.config import settings
from hull.runtime import factory, rebuild


class Spawned:
    """Stands in for subprocess.Popen: records the builder's argv and keeps the lock fd
    it was handed, as the detached builder does."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.held: list[int] = []

    def __call__(self, argv: list[str], pass_fds: tuple[int, ...], **kw: Any) -> None:
        self.calls.append(argv)
        self.held.append(os.dup(pass_fds[0]))

    def release(self) -> None:
        for fd in self.held:
            os.close(fd)
        self.held.clear()


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Any:
    fake = Spawned()
    monkeypatch.setattr("hull.runtime.rebuild.subprocess.Popen", fake)
    yield fake
    fake.release()


def config_in(tmp_path: Path) -> settings.Config:
    config = settings.Config()
    config.factory.template_dir = str(tmp_path / "t")
    config.factory.enabled = True
    config.hypervisor.default_memory_mib = 512
    config.hypervisor.kernel_params = 'a="b c" d\\e'
    return config


def test_one_builder_per_key_with_the_requesters_configuration(tmp_path: Path,
                                                               spawned: Spawned) -> None:
    config = config_in(tmp_path)
    assert "in the background" in rebuild.request(config, "k1", "none yet")
    (argv,) = spawned.calls
    lock = Path(argv[argv.index("--config") + 1])
    assert argv[-4:-2] == ["factory", "init"] and argv[-2] == "--lock-fd"
    assert settings.load(lock).as_dict() == config.as_dict()
    # The builder holds the lock: a second request for the key does nothing ...
    assert rebuild.request(config, "k1", "again") == "it is being built"
    # ... while another key gets its own builder.
    assert "in the background" in rebuild.request(config, "k2", "other size")
    assert len(spawned.calls) == 2
    spawned.release()
    assert "in the background" in rebuild.request(config, "k1", "builder done")


def test_no_new_attempt_soon_after_a_failure(tmp_path: Path, spawned: Spawned) -> None:
    config = config_in(tmp_path)
    factory.root(config).mkdir(parents=True)
    fd = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    with pytest.raises(RuntimeError), rebuild.builder(config, "k1", fd):
        raise RuntimeError("the image is broken")
    failed = factory.root(config) / ".key-k1.failed"
    assert "the image is broken" in failed.read_text()
    assert not (factory.root(config) / ".key-k1.pid").exists()
    answer = rebuild.request(config, "k1", "stale")
    assert "failed" in answer and "next attempt" in answer and not spawned.calls
    old = time.time() - rebuild.RETRY_AFTER - 1
    os.utime(failed, (old, old))
    assert "in the background" in rebuild.request(config, "k1", "stale")


def fake_template(path: Path, key: dict[str, Any]) -> None:
    path.mkdir(parents=True)
    (path / "empty").mkdir()
    state = b"QEVM" + bytes(100)
    (path / "state").write_bytes(state)
    (path / "ram").write_bytes(bytes(4096))
    st = (path / "ram").stat()
    (path / factory.MANIFEST).write_text(json.dumps({
        "format": factory.FORMAT, "key": key, "state_sha256": hashlib.sha256(state).hexdigest(),
        "ram_size": st.st_size, "ram_ino": st.st_ino}))


def test_prune_keeps_other_sizes_and_removes_other_assets(tmp_path: Path) -> None:
    config = config_in(tmp_path)
    base = factory.root(config)
    key = {"format": factory.FORMAT, "image": ["/i/2", 1, 1], "vcpus": 1, "memory_mib": 256}
    fake_template(base / factory.key_id(key), key)
    bigger = dict(key, memory_mib=512, vcpus=2)
    fake_template(base / factory.key_id(bigger), bigger)
    stale = dict(key, image=["/i/1", 1, 1])
    fake_template(base / factory.key_id(stale), stale)
    (base / "garbage").mkdir()
    removed = factory.prune(config, key)
    assert sorted(p.name for p in removed) == sorted([factory.key_id(stale), "garbage"])
    assert sorted(p.name for p in base.iterdir()) == sorted(
        [factory.key_id(key), factory.key_id(bigger)])
