"""Per-pod configuration overrides through OCI annotations.

An annotation ``io.hull.config.<section>.<key>`` sets that key of configuration.toml for
one sandbox, if and only if ``runtime.annotation_allowlist`` names ``<section>.<key>``
(Kata's ``enable_annotations``). Anything else under the prefix is refused with one
error naming the annotation; values are parsed as the key's type and checked as the file's.

Both sandbox creators call :func:`apply_annotations`: CLI mode in ``hull proxy`` (from the
bundle's annotations) and the containerd shim v2 when it creates a pod's sandbox.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from hull.config.settings import NOT_OVERRIDABLE, SECTIONS, Config
from hull.errors import ConfigError

PREFIX = "io.hull.config."


def _parse(annotation: str, want: type[Any], text: str) -> Any:
    if want is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"annotation {annotation}={text!r}: expected true or false")
    if want in (int, float):
        try:
            return want(text)
        except ValueError:
            raise ConfigError(f"annotation {annotation}={text!r}: expected "
                              f"{'an integer' if want is int else 'a number'}") from None
    if want is list:
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def overrides(annotations: Mapping[str, str]) -> dict[str, str]:
    """The io.hull.config.* annotations, as {"section.key": value}."""
    return {name[len(PREFIX):]: value for name, value in annotations.items()
            if name.startswith(PREFIX)}


def apply_annotations(config: Config, annotations: Mapping[str, str]) -> Config:
    """``config`` with the allowed io.hull.config.* annotations applied (a new Config).

    Raises ConfigError naming the first annotation that is unknown, not allowed, or
    whose value does not fit; ``config`` itself is never changed.
    """
    wanted = overrides(annotations)
    if not wanted:
        return config
    allowed = set(config.runtime.annotation_allowlist)
    result = copy.deepcopy(config)
    for name, text in sorted(wanted.items()):
        annotation = PREFIX + name
        section_name, _, key = name.partition(".")
        section_type = SECTIONS.get(section_name)
        known = {f.name for f in fields(section_type)} if section_type else set()
        if key not in known:
            raise ConfigError(f"annotation {annotation}: {name} is not a configuration key")
        if name not in allowed or name in NOT_OVERRIDABLE:
            raise ConfigError(f"annotation {annotation} is not allowed: add {name!r} to "
                              "runtime.annotation_allowlist in the configuration to allow it")
        section = getattr(result, section_name)
        setattr(section, key, _parse(annotation, type(getattr(section, key)), text))
    try:
        result.check()
    except ConfigError as exc:
        raise ConfigError(f"annotations {', '.join(PREFIX + n for n in sorted(wanted))}: "
                          f"{exc}") from None
    return result
