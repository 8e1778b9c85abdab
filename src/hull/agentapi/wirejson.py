"""JSON for control messages, straight from the C accelerator ``_json``.

The ``json`` package compiles regular expressions when it is imported (and imports
``re`` to do so): ~35 ms in the guest agent at every boot under TCG, for a codec whose
work is done in C anyway. This module drives the same C scanner and encoder that
``json.loads``/``json.dumps`` use, so the output is the same as
``json.dumps(obj, separators=(",", ":"))``. It is stricter on input, which suits a channel
where the peer is untrusted: UTF-8 only, no whitespace around the top-level value, no
NaN/Infinity. Without ``_json`` (another Python) it falls back to the json package.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: the agent must not import typing (records.py)
if TYPE_CHECKING:
    from collections.abc import Callable


class JSONError(ValueError):
    """The bytes are not one strict JSON value."""


def _refuse_constant(name: str) -> object:
    raise JSONError(f"{name} is not allowed")


def _refuse_type(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


class _Context:
    """What _json.make_scanner reads from a json.JSONDecoder."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_refuse_constant)
    memo: dict[object, object] = {}


try:
    import _json
except ImportError:  # pragma: no cover - CPython always has it
    _json = None  # type: ignore[assignment]

if _json is not None:
    _scan: Callable[[str, int], tuple[object, int]] = _json.make_scanner(
        _Context())  # type: ignore[arg-type]  # duck-typed: it reads these attributes

    def dumps(obj: object) -> bytes:
        """``json.dumps(obj, separators=(",", ":"), allow_nan=False)``, as ASCII bytes."""
        encode = _json.make_encoder({}, _refuse_type, _json.encode_basestring_ascii, None,
                                    ":", ",", False, False, False)
        return "".join(encode(obj, 0)).encode("ascii")

    def loads(data: bytes) -> object:
        """One JSON value that fills ``data`` exactly; :class:`JSONError` otherwise."""
        try:
            text = data.decode("utf-8")
            value, end = _scan(text, 0)
        except StopIteration:
            raise JSONError("no JSON value at the start") from None
        except RecursionError:
            raise JSONError("nested too deeply") from None
        except ValueError as exc:  # UnicodeDecodeError, json.JSONDecodeError
            raise JSONError(str(exc)) from None
        except SystemError:
            # The scanner builds its error from json.decoder.JSONDecodeError, taken from
            # sys.modules without importing it: where the json package was never imported
            # (the agent, lean host processes) a malformed value inside an array or object
            # comes out as "returned NULL without setting an exception". Found by atheris.
            raise JSONError("malformed JSON value") from None
        if end != len(text):
            raise JSONError(f"extra data at character {end}")
        return value

else:  # pragma: no cover
    import json as _fallback

    def dumps(obj: object) -> bytes:
        return _fallback.dumps(obj, separators=(",", ":"), allow_nan=False).encode()

    def loads(data: bytes) -> object:
        try:
            return _fallback.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
        except RecursionError:
            raise JSONError("nested too deeply") from None
        except ValueError as exc:
            raise JSONError(str(exc)) from None
