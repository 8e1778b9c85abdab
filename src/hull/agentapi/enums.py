"""A light stand-in for :class:`enum.StrEnum` and :class:`enum.IntEnum`, for the protocol's
types (hull.agentapi.schema, hull.agentapi.framing).

Every CLI-mode shim imports those types and keeps what it imports for as long as its
container process lives. ``enum`` brings functools, collections, operator, reprlib and
keyword along: ~0.75 MiB of private memory in each shim (docs/performance.md, host
memory). This module defines the same declarations with the behaviour Hull uses and
nothing it does not, in a few classes and no imports.

Use it as (type checkers see the real enums; mypy treats any ``TYPE_CHECKING`` as true)::

    TYPE_CHECKING = False
    if TYPE_CHECKING:
        from enum import StrEnum
    else:
        from hull.agentapi.enums import StrEnum

Supported: members declared as class attributes (plain values, not ``auto()``); members
are instances of ``str`` / ``int`` equal to (and hashing as) their values, singletons
(``Kind(4) is Kind.DATA``); ``Cls(value)`` (ValueError for an unknown one), ``Cls[name]``,
iteration in declaration order, ``len``, ``in`` for members, ``__members__``; ``.name``
and ``.value``; ``str()`` and ``format()`` as the value (as StrEnum and IntEnum do since
Python 3.11), ``repr()`` as ``<Cls.NAME: value>``; copy and pickle give the member back.
Not supported: methods or properties that are meant to be members, aliases, ``Flag``,
subclassing an enum that has members.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any


class _EnumType(type):
    """Turns a class's public plain attributes into its members."""

    _member_map_: dict[str, object]
    _value2member_map_: dict[object, object]

    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, object]
                ) -> _EnumType:
        declared = {key: value for key, value in namespace.items()
                    if not key.startswith("_") and not callable(value)
                    and not isinstance(value, property | classmethod | staticmethod)}
        for key in declared:
            del namespace[key]
        cls = super().__new__(mcs, name, bases, namespace)
        base: Any = getattr(cls, "_base_type_", object)
        if declared and base is object:
            raise TypeError(f"{name}: members need a StrEnum or IntEnum base")
        if declared and getattr(cls, "_member_map_", None):
            raise TypeError(f"{name}: cannot extend an enum that has members")
        cls._member_map_ = {}
        cls._value2member_map_ = {}
        for key, value in declared.items():
            plain = base(value)
            if plain in cls._value2member_map_:
                raise TypeError(f"{name}.{key}: value {value!r} is taken (no aliases)")
            member = base.__new__(cls, plain)
            member._name_ = key
            member._value_ = plain
            cls._member_map_[key] = member
            cls._value2member_map_[plain] = member
            type.__setattr__(cls, key, member)
        return cls

    def __call__(cls, value: object) -> object:
        try:
            return cls._value2member_map_[value]
        except (KeyError, TypeError):
            raise ValueError(f"{value!r} is not a valid {cls.__qualname__}") from None

    def __getitem__(cls, name: str) -> object:
        return cls._member_map_[name]

    def __iter__(cls) -> Iterator[object]:
        return iter(list(cls._member_map_.values()))

    def __len__(cls) -> int:
        return len(cls._member_map_)

    def __contains__(cls, member: object) -> bool:
        return isinstance(member, cls) and member in cls._value2member_map_

    @property
    def __members__(cls) -> dict[str, object]:
        return dict(cls._member_map_)

    def __repr__(cls) -> str:
        return f"<enum {cls.__name__!r}>"


class _Member:
    """Methods shared by StrEnum and IntEnum members (a mixin before str / int)."""

    _name_: str
    _value_: object

    @property
    def name(self) -> str:
        return self._name_

    @property
    def value(self) -> object:
        return self._value_

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self._name_}: {self._value_!r}>"

    # The value is a plain str or int: str() and format() of it are the member's own,
    # as StrEnum and IntEnum give them since Python 3.11.
    def __str__(self) -> str:
        return str(self._value_)

    def __format__(self, spec: str) -> str:
        return format(self._value_, spec)

    def __reduce_ex__(self, protocol: object) -> tuple[object, tuple[object]]:
        return type(self), (self._value_,)

    def __copy__(self) -> object:
        return self

    def __deepcopy__(self, memo: object) -> object:
        return self


class StrEnum(_Member, str, metaclass=_EnumType):
    _base_type_ = str


class IntEnum(_Member, int, metaclass=_EnumType):
    _base_type_ = int
