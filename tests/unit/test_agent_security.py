"""Issue 5 in host mode: capabilities, seccomp, rlimits, user namespaces, cgroup files,
stats/update and bad input, checked from inside the container with busybox."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hull.agent import seccomp
from hull.agentapi import schema
from tests.agent_harness import Agent, make_rootfs, running_agent, spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent needs root")


@pytest.fixture(scope="module")
def share_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shares = tmp_path_factory.mktemp("shares")
    make_rootfs(shares / "rootfs")
    return shares


@pytest.fixture
def cgroot(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    return root


@pytest.fixture
def agent(tmp_path: Path, share_dir: Path, cgroot: Path) -> Iterator[Agent]:
    with running_agent(tmp_path, share_dir, cgroup_root=cgroot) as agent:
        yield agent


def run(agent: Agent, cid: str, config: dict[str, Any]) -> tuple[int, str, str]:
    out, err = 2 * agent.next_id + 100, 2 * agent.next_id + 101
    agent.run(cid, config, {"stdout": out, "stderr": err})
    event = agent.wait_exit(cid)
    agent.ok("delete_container", {"container_id": cid})
    return event.status, agent.output(out).decode(), agent.output(err).decode()


def create_error(agent: Agent, config: dict[str, Any]) -> str:
    response = agent.create("bad", config, {"stdout": 1})
    assert response.error_kind == schema.ErrorKind.INVALID, response
    assert agent.call("delete_container", {"container_id": "bad"}).error_kind == \
        schema.ErrorKind.NOT_FOUND
    return response.error_message


CAP_STATUS = "grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status"


def test_capabilities_all_five_sets(agent: Agent) -> None:
    config = spec(["sh", "-c", CAP_STATUS])
    config["process"]["capabilities"] = {
        "bounding": ["CAP_CHOWN", "CAP_NET_RAW", "CAP_KILL"],
        "effective": ["CAP_CHOWN", "CAP_KILL"], "permitted": ["CAP_CHOWN", "CAP_KILL"],
        "inheritable": ["CAP_KILL"], "ambient": ["CAP_KILL"]}
    status, out, err = run(agent, "caps", config)
    assert status == 0, err
    fields = dict(line.split(":\t") for line in out.splitlines())
    # sh was exec'd: ambient KILL (bit 5) lands in permitted+effective; CHOWN (bit 0)
    # is not inheritable, so a root execve gets it back from the bounding set only.
    assert int(fields["CapBnd"], 16) == (1 << 0) | (1 << 13) | (1 << 5)
    assert int(fields["CapInh"], 16) == 1 << 5
    assert int(fields["CapAmb"], 16) == 1 << 5


def test_dropped_chown_fails_and_nnp(agent: Agent) -> None:
    config = spec(["sh", "-c", "chown 1000 /tmp/f; grep NoNewPrivs /proc/self/status"])
    config["process"]["capabilities"] = {k: ["CAP_KILL"] for k in
                                         ("bounding", "effective", "permitted")}
    config["process"]["noNewPrivileges"] = True
    config["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"})
    config["process"]["args"][2] = "touch /tmp/f; " + config["process"]["args"][2]
    _status, out, err = run(agent, "chown", config)
    assert "Operation not permitted" in err
    assert "NoNewPrivs:\t1" in out


def test_non_root_user_keeps_listed_caps(agent: Agent) -> None:
    config = spec(["sh", "-c", "id -u; id -G; " + CAP_STATUS], uid=1000, gid=1000,
                  additional_gids=[5, 7])
    config["process"]["capabilities"] = {k: ["CAP_NET_BIND_SERVICE"] for k in
                                         ("bounding", "effective", "permitted", "ambient",
                                          "inheritable")}
    status, out, err = run(agent, "user", config)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == "1000" and lines[1].split() == ["1000", "5", "7"]
    fields = dict(line.split(":\t") for line in lines[2:])
    assert int(fields["CapEff"], 16) == 1 << 10


def test_rlimits_umask_oom_score(agent: Agent) -> None:
    config = spec(["sh", "-c", "ulimit -n; ulimit -Hn; umask; cat /proc/self/oom_score_adj"])
    config["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}]
    config["process"]["user"]["umask"] = 0o027
    config["process"]["oomScoreAdj"] = 500
    config["process"]["apparmorProfile"] = "docker-default"
    status, out, err = run(agent, "limits", config)
    assert status == 0, err
    assert out.split() == ["123", "456", "0027", "500"]
    assert "apparmorProfile 'docker-default' ignored" in agent.log()


def profile(**extra: Any) -> dict[str, Any]:
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}], **extra}


def test_seccomp_denies_mkdir_with_eperm(agent: Agent) -> None:
    config = spec(["sh", "-c", "mkdir /tmp/x; echo rc=$?; touch /tmp/y && echo touched"])
    config["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"})
    config["linux"]["seccomp"] = profile()
    _status, out, err = run(agent, "scmp", config)
    assert "Operation not permitted" in err
    assert "rc=1" in out and "touched" in out


def test_seccomp_args_and_errno(agent: Agent) -> None:
    # personality(0xffffffff) queries; deny only that value, with ENOSYS
    config = spec(["sh", "-c", "mkdir /tmp/x && echo made"])
    config["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"})
    config["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS,
             "args": [{"index": 1, "value": 0o777, "op": "SCMP_CMP_EQ"}]}]}
    _status, out, err = run(agent, "scmp2", config)
    assert "Function not implemented" in err or "not implemented" in err, (out, err)


def test_seccomp_compiler_ops() -> None:
    for op in ("SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_GT", "SCMP_CMP_GE",
               "SCMP_CMP_MASKED_EQ"):
        f = seccomp.compile_profile({"defaultAction": "SCMP_ACT_KILL_PROCESS", "syscalls": [
            {"names": ["read", "chown32"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 2**40 + 3, "valueTwo": 3, "op": op}]}]})
        assert len(f.program) % 8 == 0 and len(f.program) > 8 * 8


def test_bad_input_names_the_field(agent: Agent) -> None:
    config = spec(["true"])
    config["process"]["capabilities"] = {"bounding": ["CAP_FLY"]}
    assert "process.capabilities.bounding: unknown capability 'CAP_FLY'" in \
        create_error(agent, config)
    config = spec(["true"])
    config["linux"]["seccomp"] = profile(defaultAction="SCMP_ACT_MAYBE")
    assert "linux.seccomp.defaultAction: unknown action 'SCMP_ACT_MAYBE'" in \
        create_error(agent, config)
    config["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW",
                                  "syscalls": [{"names": ["frobnicate"],
                                                "action": "SCMP_ACT_ERRNO"}]}
    assert "unknown syscall 'frobnicate'" in create_error(agent, config)
    config = spec(["true"])
    config["linux"]["resources"] = {"memory": {"limit": -5}}
    assert "linux.resources.memory.limit" in create_error(agent, config)
    config["linux"]["resources"] = {"memory": {"limit": 2**63 - 1}}
    assert "linux.resources.memory.limit" in create_error(agent, config)


def test_cgroup_files_and_placement(agent: Agent, cgroot: Path) -> None:
    config = spec(["sh", "-c", "echo $$"])
    config["linux"]["cgroupsPath"] = "/../pods/p1/../c1"
    config["linux"]["resources"] = {
        "memory": {"limit": 64 << 20, "swap": 96 << 20, "reservation": 32 << 20},
        "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0"},
        "pids": {"limit": 20}, "blockIO": {"weight": 500}}
    agent.run("cg", config, {"stdout": 1, "stderr": 2})
    agent.wait_exit("cg")
    cg = cgroot / "hull/pods/p1/c1"
    assert (cg / "memory.max").read_text() == str(64 << 20)
    assert (cg / "memory.swap.max").read_text() == str(32 << 20)
    assert (cg / "memory.low").read_text() == str(32 << 20)
    assert (cg / "cpu.weight").read_text() == "39"
    assert (cg / "cpu.max").read_text() == "50000 100000"
    assert (cg / "cpuset.cpus").read_text() == "0"
    assert (cg / "pids.max").read_text() == "20"
    assert (cg / "io.weight").read_text() == "default 4950"
    assert (cg / "cgroup.procs").read_text() == "0"  # the helper moved itself
    assert "+memory" in (cgroot / "hull/cgroup.subtree_control").read_text()
    (cg / "memory.current").write_text("1234\n")
    (cg / "cpu.stat").write_text("usage_usec 10\nuser_usec 6\nsystem_usec 4\n")
    (cg / "pids.max").write_text("max\n")
    stats = schema.ContainerStats.from_json(agent.ok("stats_container",
                                                     {"container_id": "cg"}))
    assert stats.memory_current == 1234 and stats.memory_max == 64 << 20
    assert stats.cpu["usage_usec"] == 10 and stats.pids_max is None
    agent.ok("update_container", {"container_id": "cg",
                                  "resources": {"pids": {"limit": 7}}})
    assert (cg / "pids.max").read_text() == "7"
    big = agent.call("update_container", {"container_id": "cg",
                                          "resources": {"memory": {"limit": 2**60}}})
    assert big.error_kind == schema.ErrorKind.INVALID
    assert "VM's memory" in big.error_message
    agent.ok("delete_container", {"container_id": "cg"})
    assert not cg.exists()


def _searchable(*paths: Path) -> None:
    """The mapped root (host uid 100000) must reach the rootfs, as with runc."""
    for path in paths:
        for p in (path, *path.parents):
            if p == Path("/tmp"):
                break
            p.chmod(p.stat().st_mode | 0o055)


def test_user_namespace_mapping(agent: Agent, tmp_path: Path, share_dir: Path) -> None:
    _searchable(tmp_path / "run", share_dir / "rootfs")
    config = spec(["sh", "-c", "cat /proc/self/uid_map /proc/self/gid_map; id -u"])
    config["linux"]["namespaces"].append({"type": "user"})
    config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    status, out, err = run(agent, "userns", config)
    assert status == 0, (out, err, agent.log())
    assert out.split() == ["0", "100000", "65536", "0", "100000", "65536", "0"]


def test_exec_joins_the_containers_user_and_pid_namespaces(agent: Agent, tmp_path: Path,
                                                          share_dir: Path) -> None:
    """The agent forks an exec straight into the init's pid namespace; the child joins
    the user namespace (and the others) itself."""
    _searchable(tmp_path / "run", share_dir / "rootfs")
    config = spec(["sleep", "30"])
    config["linux"]["namespaces"].append({"type": "user"})
    config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    agent.run("userns", config, {})
    show = "cat /proc/self/uid_map; id -u; cat /proc/1/comm; for p in self 1; do " \
           "readlink /proc/$p/ns/pid; readlink /proc/$p/ns/user; done; echo $$"
    response = agent.exec("userns", "e", {"args": ["sh", "-c", show], "env": ["PATH=/bin"],
                                          "cwd": "/"}, {"stdout": 60, "stderr": 61})
    assert response.error_kind is None and response.result is not None, response
    assert agent.wait_exit("userns", "e").status == 0, (agent.output(61), agent.log())
    out = agent.output(60).decode().split()
    assert out[:5] == ["0", "100000", "65536", "0", "sleep"], out
    own_pid, own_user, init_pid, init_user, pid = out[5:]
    assert own_pid == init_pid and own_user == init_user, out
    assert 1 < int(pid) < response.result["pid"]  # its number in the container's namespace
    agent.ok("signal_process", {"container_id": "userns", "signal": 9})
    agent.wait_exit("userns")


def test_bad_uid_mapping_fails_at_create(agent: Agent) -> None:
    config = spec(["true"])
    config["linux"]["namespaces"].append({"type": "user"})
    config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 10},
                                      {"containerID": 5, "hostID": 200000, "size": 10}]
    config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 10}]
    response = agent.create("badmap", config, {"stdout": 1})
    assert response.error_kind == schema.ErrorKind.FAILED
    assert "linux.uidMappings cannot be applied" in response.error_message


def test_network_namespace_new_and_joined(agent: Agent) -> None:
    """No path: a new netns; a (host) path: the sandbox container's namespace."""
    show = ["sh", "-c", "readlink /proc/self/ns/net; readlink /proc/self/ns/ipc"]
    sandbox = spec(["sleep", "30"])
    sandbox["linux"]["namespaces"].append({"type": "network"})
    agent.run("pod", sandbox, {})
    member = spec(show)
    member["linux"]["namespaces"] = [{"type": "pid"}, {"type": "mount"},
                                     {"type": "network", "path": "/proc/4242/ns/net"},
                                     {"type": "ipc", "path": "/proc/4242/ns/ipc"}]
    agent.run("member", member, {"stdout": 50, "stderr": 51})
    agent.wait_exit("member")
    response = agent.exec("pod", "e", {"args": show, "env": ["PATH=/bin"], "cwd": "/"},
                          {"stdout": 52})
    assert response.error_kind is None, response
    agent.wait_exit("pod", "e")
    member_ns, pod_ns = agent.output(50).split(), agent.output(52).split()
    assert len(pod_ns) == 2 and member_ns == pod_ns, (agent.output(51), agent.log())
    assert pod_ns[0] != os.readlink("/proc/self/ns/net").encode()
    agent.ok("signal_process", {"container_id": "pod", "signal": 9})
    agent.wait_exit("pod")
