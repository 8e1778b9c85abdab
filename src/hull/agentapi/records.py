"""A light stand-in for :mod:`dataclasses`, for the modules the guest agent imports.

The agent imports hull.agentapi at every boot, in a guest that runs under TCG, where
Python is ten to fifty times slower than on the host. There, ``dataclasses`` costs about
110 ms to import (with typing, inspect, ast, dis, tokenize ...) and each ``@dataclass``
about 7 ms more, because it compiles the generated methods with ``exec()``: the schema's
classes alone took ~100 ms. This module gives the same declarations the same behaviour
without either cost: generic methods that read the field list, no code generation.

Use it as::

    TYPE_CHECKING = False
    if TYPE_CHECKING:
        from dataclasses import dataclass, field
    else:
        from hull.agentapi.records import dataclass, field

so type checkers still see real dataclasses (mypy treats any ``TYPE_CHECKING`` name as
true). Supported: ``frozen`` and ``slots`` (the class is always rebuilt with
``__slots__``), field defaults and ``field(default_factory=...)``, ``__eq__``,
``__hash__`` (frozen classes), ``__repr__``, ``__match_args__``, and :func:`asdict`. Not
supported: inheritance between records, ``InitVar``/``ClassVar`` fields, ``__post_init__``
and zero-argument ``super()`` in methods (the class object is replaced).
"""

from __future__ import annotations

_MISSING = object()


class FrozenInstanceError(AttributeError):
    """Assignment to a field of a frozen record."""


class _Field:
    __slots__ = ("default_factory",)

    def __init__(self, default_factory: object) -> None:
        self.default_factory = default_factory


def field(*, default_factory: object) -> object:
    """Only ``default_factory`` is supported (a plain default is written as ``= value``)."""
    return _Field(default_factory)


def _init(self: object, *args: object, **kwargs: object) -> None:
    cls = type(self)
    names: tuple[str, ...] = cls.__record_fields__  # type: ignore[attr-defined]
    if len(args) > len(names):
        raise TypeError(f"{cls.__name__}() takes {len(names)} arguments, {len(args)} given")
    values = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {key!r}")
        if key in values:
            raise TypeError(f"{cls.__name__}() got multiple values for argument {key!r}")
        values[key] = value
    defaults: dict[str, object] = cls.__record_defaults__  # type: ignore[attr-defined]
    for name in names:
        if name in values:
            value = values[name]
        else:
            value = defaults.get(name, _MISSING)
            if value is _MISSING:
                raise TypeError(f"{cls.__name__}() missing required argument {name!r}")
            if isinstance(value, _Field):
                value = value.default_factory()  # type: ignore[operator]
        object.__setattr__(self, name, value)


def _values(self: object) -> tuple[object, ...]:
    return tuple(getattr(self, name) for name in type(self).__record_fields__)  # type: ignore[attr-defined]


def _repr(self: object) -> str:
    names = type(self).__record_fields__  # type: ignore[attr-defined]
    inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
    return f"{type(self).__qualname__}({inner})"


def _eq(self: object, other: object) -> object:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return bool(_values(self) == _values(other))


def _hash(self: object) -> int:
    return hash(_values(self))


def _frozen_setattr(self: object, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: object, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def _getstate(self: object) -> tuple[object, ...]:
    return _values(self)


def _setstate(self: object, state: tuple[object, ...]) -> None:
    for name, value in zip(type(self).__record_fields__, state, strict=True):  # type: ignore[attr-defined]
        object.__setattr__(self, name, value)


def _build(cls: type, frozen: bool) -> type:
    # not inspect.get_annotations: importing inspect is what this module avoids
    names = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063
    namespace = dict(cls.__dict__)
    defaults = {name: namespace.pop(name) for name in names if name in namespace}
    namespace.pop("__dict__", None)
    namespace.pop("__weakref__", None)
    namespace.update(
        __slots__=names, __record_fields__=names, __record_defaults__=defaults,
        __match_args__=names, __init__=_init, __repr__=_repr, __eq__=_eq,
        __getstate__=_getstate, __setstate__=_setstate)
    if frozen:
        namespace.update(__hash__=_hash, __setattr__=_frozen_setattr,
                         __delattr__=_frozen_delattr)
    else:
        namespace["__hash__"] = None  # as dataclasses: eq without frozen is unhashable
    return type(cls)(cls.__name__, cls.__bases__, namespace)


def dataclass(cls: type | None = None, /, *, frozen: bool = False, slots: bool = False
              ) -> object:
    """``@dataclass`` or ``@dataclass(frozen=..., slots=...)`` (slots are always on)."""
    if cls is None:
        return lambda c: _build(c, frozen)
    return _build(cls, frozen)


def is_record(obj: object) -> bool:
    return hasattr(type(obj), "__record_fields__")


def asdict(obj: object) -> dict[str, object]:
    """A record as a dict, recursing into records, lists, tuples and dicts (as
    :func:`dataclasses.asdict` does; containers are copied)."""
    if not is_record(obj):
        raise TypeError("asdict() should be called on record instances")
    return {name: _plain(getattr(obj, name))
            for name in type(obj).__record_fields__}  # type: ignore[attr-defined]


def _plain(value: object) -> object:
    if is_record(value):
        return asdict(value)
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return type(value)((_plain(k), _plain(v)) for k, v in value.items())
    return value
