"""The shim's pod placeholders (hull.shim.v2.placeholder): one process per task, in the
network namespace the spec names, that fails at once when it cannot get there."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hull.errors import HullError
from hull.shim.v2.placeholder import Placeholder


@pytest.fixture
def netns() -> Iterator[Path]:
    name = f"hullt-ph-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield Path("/var/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ns_of(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def spec(**network: str) -> dict[str, Any]:
    return {"linux": {"namespaces": [{"type": "network", **network}]}}


def test_placeholders_sit_in_the_spec_s_namespace(netns: Path) -> None:
    async def main() -> None:
        named = await Placeholder.spawn("t1", spec(path=str(netns)))
        new = await Placeholder.spawn("t2", spec())
        own = await Placeholder.spawn("t3", {})
        try:
            assert Path(f"/proc/{named.pid}/cmdline").read_bytes() == b"hull-pause t1\0infinity\0"
            assert ns_of(named.pid) == os.stat(netns).st_ino
            assert ns_of(new.pid) not in (ns_of("self"), os.stat(netns).st_ino)
            assert ns_of(own.pid) == ns_of("self")
        finally:
            for p in (named, new, own):
                await p.stop()
        for p in (named, new, own):
            assert not Path(f"/proc/{p.pid}").exists()

    asyncio.run(main())


@pytest.mark.parametrize("path", ["/var/run/netns/hull-none", "/etc/hostname"])
def test_a_namespace_it_cannot_enter_fails_the_spawn(path: str) -> None:
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(HullError, match=f"task t4: cannot enter network namespace {path}"):
        asyncio.run(Placeholder.spawn("t4", spec(path=path)))
    assert len(os.listdir("/proc/self/fd")) == before
