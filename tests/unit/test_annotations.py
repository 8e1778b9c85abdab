"""Per-pod overrides through io.hull.config.* annotations, gated by the allow-list."""

from pathlib import Path

import pytest

from hull.config import settings
from hull.config.annotations import apply_annotations
from hull.errors import ConfigError

DEFAULT_FILE = Path(settings.__file__).with_name("configuration.toml")


def config(allow: list[str]) -> settings.Config:
    c = settings.Config()
    c.runtime.annotation_allowlist = allow
    c.check()
    return c


def test_allowed_annotations_apply_to_a_copy() -> None:
    base = config(["hypervisor.default_memory_mib", "hypervisor.debug_console"])
    got = apply_annotations(base, {"io.hull.config.hypervisor.default_memory_mib": "512",
                                   "io.hull.config.hypervisor.debug_console": "true",
                                   "io.kubernetes.cri.sandbox-id": "x"})
    assert got.hypervisor.default_memory_mib == 512 and got.hypervisor.debug_console
    assert base.hypervisor.default_memory_mib == 256 and not base.hypervisor.debug_console


def test_no_annotations_is_the_same_config() -> None:
    base = config([])
    assert apply_annotations(base, {"other": "1"}) is base


def test_an_annotation_outside_the_allow_list_is_rejected_with_one_clear_error() -> None:
    base = config(["hypervisor.default_memory_mib"])
    with pytest.raises(ConfigError) as err:
        apply_annotations(base, {"io.hull.config.hypervisor.path": "/tmp/evil-qemu"})
    message = str(err.value)
    assert "io.hull.config.hypervisor.path is not allowed" in message
    assert "runtime.annotation_allowlist" in message
    assert "\n" not in message


@pytest.mark.parametrize("name, value, message", [
    ("hypervisor.nope", "1", "not a configuration key"),
    ("bogus.key", "1", "not a configuration key"),
    ("hypervisor.default_memory_mib", "lots", "expected an integer"),
    ("hypervisor.default_memory_mib", "1", "outside"),
    ("hypervisor.debug_console", "maybe", "expected true or false"),
])
def test_bad_annotations(name: str, value: str, message: str) -> None:
    base = config(["hypervisor.default_memory_mib", "hypervisor.debug_console"])
    with pytest.raises(ConfigError, match=message):
        apply_annotations(base, {f"io.hull.config.{name}": value})


@pytest.mark.parametrize("text, message", [
    ('[runtime]\nannotation_allowlist = ["hypervisor.bogus"]\n', "not a configuration key"),
    ('[runtime]\nannotation_allowlist = ["runtime.annotation_allowlist"]\n', "cannot be"),
    ('[runtime]\nannotation_allowlist = [1]\n', "must be a list of strings"),
    ('[runtime]\nannotation_allowlist = "hypervisor.path"\n', "must be a list of strings"),
])
def test_bad_allow_lists(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        settings.load(f)


def test_every_key_is_documented_in_configuration_toml() -> None:
    text = DEFAULT_FILE.read_text()
    for section, table in settings.Config().as_dict().items():
        assert f"[{section}]" in text
        for key in table:
            assert f"\n{key} = " in text, f"{section}.{key} is not in configuration.toml"
