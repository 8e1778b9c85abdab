"""A corpus of malformed input: config.json, process.json and command lines. Each gets one
clear error line and exit status 1 (255 for exec, as runc), and leaves nothing behind
(no state directory, no process, no mount: the no_leaks fixture checks)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import BundleFactory, Runner

Spec = dict[str, Any]


def setp(path: str, value: Any) -> Callable[[Spec], None]:
    def apply(spec: Spec) -> None:
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node[key]
        node[last] = value
    return apply


def drop(path: str) -> Callable[[Spec], None]:
    def apply(spec: Spec) -> None:
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node[key]
        node.pop(last)
    return apply


CONFIGS: list[tuple[str, Callable[[Spec], None], str]] = [
    ("no-ociversion", drop("ociVersion"), "ociVersion is missing"),
    ("empty-ociversion", setp("ociVersion", ""), "ociVersion is missing"),
    ("numeric-ociversion", setp("ociVersion", 1), "ociVersion is missing"),
    ("ociversion-2", setp("ociVersion", "2.0.0"), "unsupported ociVersion"),
    ("ociversion-0", setp("ociVersion", "0.9"), "unsupported ociVersion"),
    ("no-root", drop("root"), "root.path is missing"),
    ("root-not-object", setp("root", "rootfs"), "root.path is missing"),
    ("root-path-empty", setp("root.path", ""), "root.path is missing"),
    ("root-path-number", setp("root.path", 7), "root.path is missing"),
    ("root-readonly-string", setp("root.readonly", "yes"), "root.readonly must be a boolean"),
    ("root-missing-dir", setp("root.path", "nowhere"), "is not a directory"),
    ("no-process", drop("process"), "process is missing"),
    ("process-list", setp("process", []), "process is missing"),
    ("no-args", drop("process.args"), "args must be a non-empty list"),
    ("empty-args", setp("process.args", []), "args must be a non-empty list"),
    ("args-string", setp("process.args", "sh"), "args must be a non-empty list"),
    ("args-number", setp("process.args", [1]), "args must be a non-empty list"),
    ("env-string", setp("process.env", "A=1"), "env must be a list"),
    ("env-no-equals", setp("process.env", ["A"]), "env must be a list"),
    ("env-number", setp("process.env", [5]), "env must be a list"),
    ("cwd-relative", setp("process.cwd", "tmp"), "cwd must be an absolute path"),
    ("cwd-number", setp("process.cwd", 0), "cwd must be an absolute path"),
    ("terminal-string", setp("process.terminal", "no"), "terminal must be a boolean"),
    ("user-string", setp("process.user", "root"), "user must be an object"),
    ("uid-negative", setp("process.user.uid", -1), "user.uid must be an integer"),
    ("uid-huge", setp("process.user.uid", 2**40), "user.uid must be an integer"),
    ("uid-bool", setp("process.user.uid", True), "user.uid must be an integer"),
    ("gid-string", setp("process.user.gid", "0"), "user.gid must be an integer"),
    ("gids-string", setp("process.user.additionalGids", "1"), "additionalGids"),
    ("gids-negative", setp("process.user.additionalGids", [-5]), "additionalGids"),
    ("hostname-number", setp("hostname", 5), "hostname must be a string"),
    ("hostname-long", setp("hostname", "h" * 65), "hostname must be a string"),
    ("annotations-list", setp("annotations", ["a"]), "annotations must map strings"),
    ("annotation-number", setp("annotations", {"a": 1}), "annotations must map strings"),
    ("hooks-list", setp("hooks", []), "hooks must be an object"),
    ("hook-relative", setp("hooks", {"prestart": [{"path": "true"}]}), "must be absolute"),
    ("hook-kind-object", setp("hooks", {"prestart": {"path": "/bin/true"}}),
     "hooks.prestart must be a list"),
]


@pytest.mark.parametrize("name, mutate, text", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("verb", ["run", "create"])
def test_bad_config(hull: Runner, bundle: BundleFactory, state_root: Path, name: str,
                    mutate: Callable[[Spec], None], text: str, verb: str) -> None:
    b = bundle(["true"], mutate=mutate)
    done = hull(verb, "--bundle", str(b), "bad")
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, lines
    assert text in lines[0]
    assert not (state_root / "bad").exists()


NOT_JSON = ["", "{", "[1, 2]", "null", "\"text\"", "{\"ociVersion\": }", "\x00\x01"]


@pytest.mark.parametrize("text", NOT_JSON)
def test_config_that_is_not_a_json_object(hull: Runner, bundle: BundleFactory,
                                          text: str) -> None:
    b = bundle(["true"])
    (b / "config.json").write_text(text)
    done = hull("run", "--bundle", str(b), "bad")
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, lines
    assert "config.json" in lines[0]


PROCESSES: list[tuple[str, str, str]] = [
    ("not-json", "{", "not valid JSON"),
    ("list", "[]", "must hold a JSON object"),
    ("no-args", json.dumps({"cwd": "/"}), "args must be a non-empty list"),
    ("bad-env", json.dumps({"args": ["true"], "env": "X"}), "env must be a list"),
    ("bad-cwd", json.dumps({"args": ["true"], "cwd": "x"}), "cwd must be an absolute path"),
    ("bad-user", json.dumps({"args": ["true"], "user": {"uid": "0"}}), "user.uid"),
]


@pytest.mark.parametrize("name, text, message", PROCESSES, ids=[p[0] for p in PROCESSES])
def test_bad_process_file(hull: Runner, tmp_path: Path, name: str, text: str,
                          message: str) -> None:
    path = tmp_path / "process.json"
    path.write_text(text)
    done = hull("exec", "--process", str(path), "nope")
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 255 and len(lines) == 1, lines
    # the container does not exist: that is checked first, or the process is
    assert "does not exist" in lines[0] or message in lines[0]


CLI: list[tuple[list[str], str]] = [
    (["run"], "required: ID"),
    (["run", "--bundle"], "expected one argument"),
    (["create", "x", "y"], "unrecognized arguments"),
    (["kill"], "required: ID"),
    (["kill", "x", "TERM", "extra"], "unrecognized arguments"),
    (["kill", "x", "-5"], "unknown signal"),
    (["kill", "x", "SIGFOO"], "unknown signal"),
    (["kill", "x", "0"], "unknown signal"),
    (["delete"], "required: ID"),
    (["list", "--format", "yaml"], "invalid choice"),
    (["ps", "--format", "xml", "x"], "invalid choice"),
    (["--log-format", "xml", "list"], "invalid choice"),
    (["--rootless", "maybe", "list"], "invalid choice"),
    (["create", "--preserve-fds", "x", "y"], "invalid int value"),
    (["run", "--bundle", "/", ".."], "invalid container id"),
    (["run", "--bundle", "/", "a b"], "invalid container id"),
    (["run", "--bundle", "/", ""], "container id cannot be empty"),
    (["--config", "/nonexistent.toml", "check"], "does not exist"),
    (["nosuchverb"], "invalid choice"),
]


@pytest.mark.parametrize("argv, text", CLI, ids=[" ".join(a) or "empty" for a, _ in CLI])
def test_bad_command_line(hull: Runner, state_root: Path, argv: list[str], text: str) -> None:
    done = hull(*argv)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, lines
    assert text in lines[0]
    assert not [p for p in state_root.glob("*") if p.name != "accel.json"]
