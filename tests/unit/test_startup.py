"""What keeps a container's start fast: light agent imports, the boot profile, lazy CLI verbs.

See docs/performance.md for the measurements behind each of these.
"""

from __future__ import annotations

import copy
import enum
import json
import math
import os
import pickle
import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest

import hull
from hull.agentapi import enums, framing, records, schema, wirejson
from hull.cli import main as cli_main
from hull.runtime import shim
from hull.runtime.sandbox import BootProfile, Timeline

SRC = Path(__file__).resolve().parents[2] / "src"

# Modules the guest agent must not import at boot: each costs 10-100 ms under TCG.
HEAVY = ("typing", "dataclasses", "inspect", "ast", "re", "json", "selectors", "asyncio")


def test_the_agent_imports_no_heavy_module() -> None:
    code = ("import sys\n"
            f"sys.path.insert(0, {str(SRC)!r})\n"
            "import hull.agent.main, hull.agent.server\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])\n")
    # -S -I: no site, no .pth files, as /init runs python in the guest
    out = subprocess.run([sys.executable, "-S", "-I", "-c", code], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------- records


@records.dataclass(frozen=True, slots=True)
class Point:
    x: int
    y: int = 0
    tags: list[str] = records.field(default_factory=list)  # type: ignore[assignment]

    def norm(self) -> float:
        return math.hypot(self.x, self.y)


def test_records_behave_like_frozen_dataclasses() -> None:
    p = Point(3, y=4)
    assert (p.x, p.y, p.tags, p.norm()) == (3, 4, [], 5.0)
    assert p == Point(3, 4) and p != Point(4, 3) and p != (3, 4)
    assert repr(p) == "Point(x=3, y=4, tags=[])"
    assert Point(1).tags is not Point(1).tags  # a fresh default per instance
    with pytest.raises(AttributeError):
        p.x = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        p.z = 1  # type: ignore[attr-defined]  # slots: no other attributes
    with pytest.raises(TypeError, match="missing required argument 'x'"):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values"):
        Point(1, x=2)  # type: ignore[misc]
    with pytest.raises(TypeError, match="unexpected keyword"):
        Point(1, z=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="takes 3 arguments"):
        Point(1, 2, [], 4)  # type: ignore[call-arg]
    assert not hasattr(p, "__dict__") and Point.__match_args__ == ("x", "y", "tags")


# ---------------------------------------------------------------------------- enums


class LeanColour(enums.StrEnum):  # type: ignore[misc]
    RED = "red"
    BLUE = "blue"


class RealColour(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


class LeanLevel(enums.IntEnum):  # type: ignore[misc]
    LOW = 1
    HIGH = 7


class RealLevel(enum.IntEnum):
    LOW = 1
    HIGH = 7


@pytest.mark.parametrize("lean, real", [(LeanColour, RealColour), (LeanLevel, RealLevel)])
def test_lean_enums_behave_like_the_real_ones(lean: Any, real: Any) -> None:
    """hull.agentapi.enums against enum, on everything Hull does with its enums."""
    def same(fn: Any) -> None:
        got, want = fn(lean), fn(real)
        assert got == want.replace(real.__name__, lean.__name__) if isinstance(want, str) \
            else got == want

    for name in lean.__members__:
        same(lambda cls, n=name: repr(cls[n]))
        same(lambda cls, n=name: (str(cls[n]), f"{cls[n]}|{cls[n]:>6}", cls[n].name))
        same(lambda cls, n=name: (cls[n].value, type(cls[n].value), hash(cls[n])))
        same(lambda cls, n=name: (cls[n] == cls[n].value, json.dumps(cls[n])))
        member = lean[name]
        assert lean(member.value) is member and getattr(lean, name) is member
        assert copy.deepcopy(member) is member and pickle.loads(pickle.dumps(member)) is member
        assert isinstance(member, lean) and member in lean
        assert {member.value: 1}[member] == 1  # hashes and compares as its value
    same(lambda cls: ([m.name for m in cls], len(cls), list(cls.__members__)))
    same(lambda cls: sorted(cls) == sorted(m.value for m in cls))
    for bad in ("green", 3, None, ["red"]):
        with pytest.raises(ValueError, match="is not a valid"):
            lean(bad)
    with pytest.raises(KeyError):
        lean["GREEN"]


def test_lean_enums_refuse_what_they_do_not_support() -> None:
    with pytest.raises(TypeError, match="no aliases"):
        class Alias(enums.StrEnum):  # type: ignore[misc]
            A = "a"
            B = "a"
    with pytest.raises(TypeError, match="cannot extend"):
        class More(LeanColour):
            GREEN = "green"


def test_protocol_enums_are_the_lean_ones_at_run_time() -> None:
    """The guest agent and every shim decode frames and messages with them."""
    assert isinstance(schema.Method.HELLO, enums.StrEnum)
    assert isinstance(framing.Kind.DATA, enums.IntEnum)
    assert framing.Kind(4) is framing.Kind.DATA and schema.Method("hello") is schema.Method.HELLO
    match framing.Kind(5):
        case framing.Kind.CLOSE:
            pass
        case _:
            pytest.fail("a member does not match itself")


def test_schema_payloads_keep_their_dataclass_api() -> None:
    hello = schema.Hello(entropy="ab", time_ns=5)
    assert hello == schema.Hello(schema.PROTOCOL_VERSION, "ab", 5)
    assert hash(hello) == hash(schema.Hello(schema.PROTOCOL_VERSION, "ab", 5))
    with pytest.raises(AttributeError):
        hello.entropy = "cd"  # type: ignore[misc]
    assert issubclass(records.FrozenInstanceError, AttributeError)
    assert not issubclass(records.FrozenInstanceError, FrozenInstanceError)
    create = schema.CreateContainer("c", {"a": [1, {"b": 2}]}, schema.RootfsShare("t"))
    params = schema.params(create)
    assert params == {"container_id": "c", "spec": {"a": [1, {"b": 2}]},
                      "rootfs": {"tag": "t", "readonly": False, "path": ""},
                      "stdio": {"stdin": None, "stdout": None, "stderr": None},
                      "hooks": {"state": {}, "create_container": [], "start_container": []}}
    params["spec"]["a"].append(3)  # a copy, as dataclasses.asdict makes
    assert create.spec == {"a": [1, {"b": 2}]}
    assert schema.CreateContainer.from_json(json.loads(json.dumps(params))).container_id == "c"


# ---------------------------------------------------------------------------- wire JSON


@pytest.mark.parametrize("value", [
    {"id": 1, "method": "hello", "params": {"entropy": "00", "time_ns": 2**62}},
    {"a": [1.5, None, True, False, "x\u00e9\n\"\\"], "b": {}, "c": []},
    {"event": schema.Event.PROCESS_EXIT, "status": 0, "signal": None},
])
def test_wire_json_is_json_dumps_compact(value: dict[str, object]) -> None:
    encoded = wirejson.dumps(value)
    assert encoded == json.dumps(value, separators=(",", ":")).encode()
    assert wirejson.loads(encoded) == json.loads(encoded)


@pytest.mark.parametrize("bad", [b"", b" {}", b"{} ", b"{}{}", b'{"a":NaN}', b"[Infinity]",
                                 b"\xff\xfe", b'{"a":1', b"[" * 100_000])
def test_wire_json_refuses_what_is_not_one_strict_value(bad: bytes) -> None:
    with pytest.raises(wirejson.JSONError):
        wirejson.loads(bad)
    with pytest.raises(schema.SchemaError):
        schema.decode(bad)


def test_wire_json_refuses_what_json_cannot_carry() -> None:
    with pytest.raises(ValueError):
        wirejson.dumps({"x": float("nan")})
    with pytest.raises(TypeError, match="not JSON serializable"):
        wirejson.dumps({"x": object()})


# ---------------------------------------------------------------------------- boot profile


def test_hello_reply_carries_checked_boot_marks() -> None:
    base = {"version": 2, "agent_version": "1", "kernel_release": "6.1"}
    assert schema.HelloReply.from_json(base).boot == {}  # an agent without marks
    reply = schema.HelloReply.from_json({**base, "boot": {"python": 0.8, "hello": 1}})
    assert reply.boot == {"python": 0.8, "hello": 1.0}
    for bad in ({"x": -1}, {"x": "1"}, {"x": True}, {"x": float("nan")}, {"x" * 40: 1},
                {f"m{i}": 1 for i in range(40)}, []):
        with pytest.raises(schema.SchemaError):
            schema.HelloReply.from_json({**base, "boot": bad})


def test_boot_profile_puts_guest_marks_on_the_host_time_line() -> None:
    guest = {"python": 0.80, "main": 0.85, "init": 0.90, "loaded": 1.00, "port": 1.01,
             "hello": 1.02}
    profile = BootProfile(spawn=10.0, qemu=10.05, ready=11.30, guest=guest)
    phases = dict(profile.phases())
    assert phases["qemu start"] == pytest.approx(0.05)
    # "hello" happened at ready: python ran 0.22 s earlier, i.e. 1.03 s after QEMU was up
    assert phases["kernel+python"] == pytest.approx(1.03)
    assert phases["agent imports"] == pytest.approx(0.05)
    assert phases["agent load"] == pytest.approx(0.10)
    assert sum(phases.values()) == pytest.approx(profile.total)
    assert "kernel+python 1.030s" in profile.describe()
    with_kernel = BootProfile(10.0, 10.05, 11.30, {**guest, "kernel.init": 0.55})
    phases = dict(with_kernel.phases())
    assert phases["kernel"] == pytest.approx(0.78) and phases["python start"] == pytest.approx(0.25)
    old_agent = BootProfile(10.0, 10.05, 11.30, {})
    assert dict(old_agent.phases()) == {"qemu start": pytest.approx(0.05),
                                        "guest": pytest.approx(1.25)}


def test_timeline_names_the_phase_that_ends() -> None:
    timeline = Timeline()
    timeline.points = [("", 1.0), ("boot", 2.5), ("create", 2.6)]
    assert timeline.total == pytest.approx(1.6)
    assert timeline.describe() == "total 1.600s: boot 1.500s, create 0.100s"


# ---------------------------------------------------------------------------- lazy CLI


def subcommands(parser: object) -> set[str]:
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def test_every_verb_is_in_the_registry_of_its_module() -> None:
    everything = subcommands(cli_main.build_parser(["--help"]))
    assert everything == {verb for verbs in cli_main.VERBS.values() for verb in verbs}


def test_a_shim_keeps_only_the_modules_it_needs(tmp_path: Path) -> None:
    """A shim lives as long as its container process: no asyncio (nor its TLS), no CLI,
    no VM side, no host networking, no logging, json or re, no site, and nothing that
    brings functools and collections (enum, threading, socket, signal, contextlib,
    queue) in its memory (docs/performance.md, host memory)."""
    (tmp_path / "c1").mkdir()
    request = shim.request_json(tmp_path / "c1", "c1", "e1", {"process": {}}, None, False,
                                None, "text", False)
    code = ("import os, sys\n"
            f"sys.path.insert(0, {str(Path(hull.__file__).parents[1])!r})\n"
            "from hull.runtime import shim\n"
            "r, w = os.pipe()\n"
            "qr, qw = os.pipe()\n"
            f"os.write(qw, {request!r}); os.close(qw)\n"
            "status = shim.main(['--ready-fd', str(w), '--request-fd', str(qr), 'c1'])\n"
            "print(status, os.read(r, 500).decode().strip())\n"
            "print(sorted(m for m in ('asyncio', 'ssl', '_ssl', 'argparse', 'dataclasses',"
            " 'hull.cli.main', 'hull.runtime.state', 'hull.network.host',"
            " 'hull.runtime.sandbox', 'qemu.qmp', 'hull.hypervisor.qemu.machine',"
            " 'hull.proxy.channel', 'logging', 'json', 're', 'site', 'typing', 'enum',"
            " 'threading', 'socket', 'signal', 'contextlib', 'queue', 'functools',"
            " 'collections', 'hull.runtime.console')"
            " if sys.modules.get(m)))\n")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout.splitlines()
    assert out[0] == "1 container c1: its proxy does not answer (No such file or directory)"
    assert out[1] == "[]"


def test_the_shim_command_runs_this_installation_without_site(tmp_path: Path) -> None:
    argv = shim.command(sys.executable, "c1")
    assert argv[:3] == [sys.executable, "-S", "-c"] and argv[-1] == "c1"
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=tmp_path,
                          env={"PATH": os.environ.get("PATH", "")})
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("usage: hull.runtime.shim --ready-fd R --request-fd Q ID")


def test_a_shim_logs_without_logging_in_hulls_formats(tmp_path: Path) -> None:
    """hull.logline: the shim's lines look like every other process's (hull.logids)."""
    import logging

    from hull.logids import JsonFormatter, TextFormatter
    from hull.logline import LineLog

    record = logging.LogRecord("hull.shim", logging.ERROR, __file__, 1, "lost %s", ("it",),
                               None)
    record.container_id = "c1"
    for fmt, formatter in (("json", JsonFormatter()), ("text", TextFormatter())):
        LineLog(str(tmp_path / f"{fmt}.log"), fmt, "c1").error("lost it")
        (line,) = (tmp_path / f"{fmt}.log").read_text().splitlines()
        expected = formatter.format(record)
        if fmt == "json":  # the same fields; the time is the line's own
            got, want = json.loads(line), json.loads(expected)
            assert got.pop("time").endswith("Z") and want.pop("time").endswith("Z")
            assert got == want == {"level": "error", "msg": "lost it", "id": "c1"}
        else:
            assert line.split(" ", 2)[2] == expected.split(" ", 2)[2] == "ERROR [c1] lost it"
    LineLog(str(tmp_path / "missing-dir" / "x.log"), "text", "c1").error("dropped")


def test_a_shim_refuses_a_bad_request_in_one_line(tmp_path: Path) -> None:
    r, w = os.pipe()
    qr, qw = os.pipe()
    os.write(qw, b'{"state_dir": 1')
    os.close(qw)
    assert shim.main(["--ready-fd", str(w), "--request-fd", str(qr), "c1"]) == 1
    answer = os.read(r, 500).decode()
    os.close(r)
    assert answer.startswith("shim of container c1: bad request: ") and answer.count("\n") == 1
    assert shim.main(["c1"]) == 2  # not as hull starts it: usage, nothing else


@pytest.mark.parametrize("argv, expected", [
    (["state", "x"], {"state"}),
    (["--root", "/tmp/r", "--log-format", "json", "exec", "x", "true"], {"exec"}),
    (["--root=/tmp/run", "--debug", "run", "-b", "b", "x"], {"run"}),
    (["resume", "x"], {"pause", "resume"}),
    (["--root", "state", "create", "x"], {"create"}),  # "state" is --root's value here
    (["bogus"], None),
    ([], None),
])
def test_a_command_registers_only_its_verb(argv: list[str], expected: set[str] | None
                                           ) -> None:
    got = subcommands(cli_main.build_parser(argv))
    every = {verb for verbs in cli_main.VERBS.values() for verb in verbs}
    assert got == (every if expected is None else expected)


def test_a_prebuilt_parser_serves_its_verb_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fork server builds the proxy verb's parser once; its proxies parse with it."""
    monkeypatch.setattr(cli_main, "_prebuilt", None)
    cli_main.prebuild_parser(["proxy"])
    argv = ["--root", "/tmp/r", "--log-format", "json", "proxy", "--ready-fd", "5",
            "--bundle", "/b", "c1"]
    parser = cli_main.build_parser(argv)
    assert cli_main.build_parser(["--debug", "proxy", "x"]) is parser
    args = parser.parse_args(argv)
    again = parser.parse_args(argv)  # a parser serves many parses alike
    assert vars(args) == vars(again) and args is not again
    assert (args.root, args.log_format, args.verb, args.container_id) == (
        "/tmp/r", "json", "proxy", "c1")
    other = cli_main.build_parser(["state", "x"])
    assert other is not parser and subcommands(other) == {"state"}
