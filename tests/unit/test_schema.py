import subprocess
import sys

import pytest

from hull.agentapi import schema


def test_create_container_round_trip() -> None:
    req = schema.CreateContainer("c1", {"ociVersion": "1.0.2"},
                                 schema.RootfsShare("hullroot", True), schema.Stdio(1, 2, 3))
    assert schema.CreateContainer.from_json(schema.params(req)) == req


def test_request_envelope() -> None:
    req = schema.Request(5, schema.Method.START_CONTAINER, {"container_id": "x"})
    decoded = schema.Request.from_json(schema.decode(schema.encode(req.to_json())))
    assert decoded == req


@pytest.mark.parametrize("obj", [
    {"id": 1, "method": "format_disk"},
    {"id": "1", "method": "hello"},
    {"id": -1, "method": "hello"},
    {"id": 1, "method": "hello", "params": []},
])
def test_bad_requests(obj: dict[str, object]) -> None:
    with pytest.raises(schema.SchemaError):
        schema.Request.from_json(obj)


def test_error_response() -> None:
    resp = schema.Response(3, error_kind=schema.ErrorKind.NOT_FOUND, error_message="no c1")
    back = schema.Response.from_json(resp.to_json())
    assert back.error_kind is schema.ErrorKind.NOT_FOUND and back.error_message == "no c1"


@pytest.mark.parametrize("obj", [
    {"container_id": "c", "exec_id": "", "status": 256},
    {"container_id": "c", "exec_id": "", "status": -1},
    {"container_id": "c", "exec_id": "", "status": True},
    {"container_id": "c" * 5000, "exec_id": "", "status": 0},
    {"container_id": "c", "exec_id": "", "status": 0, "signal": 99},
])
def test_lying_exit_events_are_refused(obj: dict[str, object]) -> None:
    with pytest.raises(schema.SchemaError):
        schema.ProcessExit.from_json(obj)


def test_stdio_refuses_shared_streams() -> None:
    with pytest.raises(schema.SchemaError):
        schema.Stdio.from_json({"stdin": 1, "stdout": 1})


@pytest.mark.parametrize("payload", [b"", b"[1]", b"\xff\xfe", b"{"])
def test_decode_refuses_non_objects(payload: bytes) -> None:
    with pytest.raises(schema.SchemaError):
        schema.decode(payload)


def test_malformed_json_is_refused_where_the_json_package_was_never_imported() -> None:
    # The guest agent and lean host processes never import json; the C scanner's error
    # path then has no JSONDecodeError to raise (found by tests/unit/atheris_decoders.py).
    code = ("import sys\n"
            "from hull.agentapi import schema\n"
            "assert 'json' not in sys.modules\n"
            "for bad in (b'{\"id\":1rs}', b'[1,]', b'{\"a\" 1}'):\n"
            "    try:\n"
            "        schema.decode(bad)\n"
            "    except schema.SchemaError:\n"
            "        continue\n"
            "    raise SystemExit(f'{bad!r} accepted')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
