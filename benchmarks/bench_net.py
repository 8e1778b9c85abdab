"""TCP round-trip latency and throughput host <-> container, Hull beside runc.

Usage: python -m benchmarks.bench_net [--rounds N] [--mb M]

Two network namespaces made for the run (deleted after): "ctr" holds a veth with
10.123.0.2/24, as a CNI plugin would leave it, and "peer" the other end (10.123.0.1/24),
playing the host side. The same busybox bundle names the ctr namespace in config.json;
runc's container joins it directly, Hull's VM mirrors it (tap + tc redirects). In the
container, busybox nc serves: 7000 echo (latency), 7001 sink, 7002 source (throughput).
A Python client in the peer namespace measures. No traffic leaves these namespaces.
Prints medians and ratios as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import busybox_bundle, machine

HULL = [sys.executable, "-m", "hull"]
CTR_IP, PEER_IP = "10.123.0.2", "10.123.0.1"

# PID 1 of a pid namespace ignores SIGTERM unless it handles it: trap it, so the runtime's
# signal forwarding ends the run cleanly (Hull then removes its taps and filters).
SERVE = ("trap 'exit 0' TERM; nc -ll -p 7000 -e /bin/cat & nc -ll -p 7001 -e /bin/sink & "
         "nc -ll -p 7002 -e /bin/source & wait")

CLIENT = r"""
import json, socket, sys, time
host, mb, rtts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def connect(port, wait):
    deadline = time.monotonic() + wait
    while True:
        try:
            s = socket.create_connection((host, port), timeout=5)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
s = connect(7000, 120)
payload, samples = b"x" * 64, []
for i in range(rtts + 20):
    t = time.perf_counter()
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        got += s.recv(4096)
    if i >= 20:
        samples.append(time.perf_counter() - t)
s.close()
s = connect(7001, 10)
chunk, total = b"\0" * 65536, mb * 1024 * 1024
t = time.perf_counter()
for _ in range(total // len(chunk)):
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
while s.recv(65536):
    pass
up = total / (time.perf_counter() - t)
s.close()
s = connect(7002, 10)
t, n = time.perf_counter(), 0
while data := s.recv(262144):
    n += len(data)
down = n / (time.perf_counter() - t)
print(json.dumps({"rtt": samples, "to_ctr": up, "from_ctr": down, "bytes": n}))
"""


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True)


def make_namespaces(tag: str) -> tuple[str, str]:
    ctr, peer = f"hullb-ctr-{tag}", f"hullb-peer-{tag}"
    for ns in (ctr, peer):
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
    ip("link", "add", "eth0", "netns", ctr, "type", "veth", "peer", "name", "peer0",
       "netns", peer)
    ip("-n", ctr, "addr", "add", f"{CTR_IP}/24", "dev", "eth0")
    ip("-n", ctr, "link", "set", "eth0", "up")
    ip("-n", peer, "addr", "add", f"{PEER_IP}/24", "dev", "peer0")
    ip("-n", peer, "link", "set", "peer0", "up")
    return ctr, peer


def bundle(work: Path, netns: str) -> Path:
    path = busybox_bundle(work / "bundle", ["sh", "-c", SERVE])
    root = path / "rootfs/bin"
    (root / "nc").symlink_to("busybox")
    (root / "sink").write_text("#!/bin/sh\nexec cat >/dev/null\n")
    source_mb = int(os.environ.get("HULL_BENCH_MB", "32"))
    (root / "source").write_text(f"#!/bin/sh\nexec dd if=/dev/zero bs=65536 "
                                 f"count={source_mb * 16} 2>/dev/null\n")
    for script in ("sink", "source"):
        (root / script).chmod(0o755)
    spec: dict[str, Any] = json.loads((path / "config.json").read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"]
                                   if ns["type"] != "network"]
    spec["linux"]["namespaces"].append({"type": "network", "path": f"/var/run/netns/{netns}"})
    (path / "config.json").write_text(json.dumps(spec, indent=2))
    return path


def measure(peer: str, mb: int, rtts: int) -> dict[str, Any]:
    done = subprocess.run(["ip", "netns", "exec", peer, sys.executable, "-c", CLIENT, CTR_IP,
                           str(mb), str(rtts)], capture_output=True, text=True, timeout=600,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"client failed: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run_one(runtime: str, work: Path, b: Path, peer: str, mb: int, rtts: int, i: int
            ) -> dict[str, Any]:
    cid = f"net-{runtime}-{i}"
    root = work / f"{runtime}-state"
    base = ["runc", "--root", str(root)] if runtime == "runc" else [*HULL, "--root", str(root)]
    proc = subprocess.Popen([*base, "run", "-b", str(b), cid], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        return measure(peer, mb, rtts)
    finally:
        proc.terminate()  # `runc run` and `hull run` forward it to the container
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run([*base, "delete", "--force", cid], capture_output=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each runtime")
    parser.add_argument("--mb", type=int, default=32, help="MiB per throughput transfer")
    parser.add_argument("--rtts", type=int, default=200, help="round trips per run")
    args = parser.parse_args()
    os.environ["HULL_BENCH_MB"] = str(args.mb)
    tag = f"{os.getpid()}"
    ctr, peer = make_namespaces(tag)
    results: dict[str, list[dict[str, Any]]] = {"hull": [], "runc": []}
    try:
        with tempfile.TemporaryDirectory(prefix="hull-bench-net-") as tmp:
            work = Path(tmp)
            b = bundle(work, ctr)
            for i in range(args.rounds):  # interleaved: the machine's noise hits both
                for runtime in ("runc", "hull"):
                    results[runtime].append(run_one(runtime, work, b, peer, args.mb,
                                                    args.rtts, i))
    finally:
        for ns in (ctr, peer):
            subprocess.run(["ip", "netns", "del", ns], check=False)

    def med(runtime: str, key: str) -> float:
        if key == "rtt":
            return statistics.median(s for r in results[runtime] for s in r["rtt"]) * 1e6
        return statistics.median(r[key] for r in results[runtime]) / 1e6

    print(f"machine: {machine()}; {args.rounds} runs each, interleaved; {args.rtts} round "
          f"trips of 64 B per run; {args.mb} MiB per transfer\n")
    print("| what | hull median | runc median | hull/runc |\n|---|---|---|---|")
    for key, what, unit in (("rtt", "TCP round trip, 64 B (peer <-> container)", "us"),
                            ("to_ctr", "TCP throughput peer -> container", "MB/s"),
                            ("from_ctr", "TCP throughput container -> peer", "MB/s")):
        h, r = med("hull", key), med("runc", key)
        print(f"| {what} | {h:.0f} {unit} | {r:.0f} {unit} | {h / r:.2f}x |")


if __name__ == "__main__":
    main()
