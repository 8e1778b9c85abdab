from pathlib import Path

import pytest

from hull.config import settings
from hull.errors import ConfigError

DEFAULT_FILE = Path(settings.__file__).with_name("configuration.toml")


def test_the_documented_default_file_loads_to_the_defaults() -> None:
    loaded = settings.load(DEFAULT_FILE)
    assert loaded.hypervisor == settings.HypervisorConfig()
    assert loaded.runtime == settings.RuntimeConfig()


def test_env_var_and_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[hypervisor]\ndefault_vcpus = 2\nboot_timeout = 10\naccelerator = "tcg"\n')
    monkeypatch.setenv(settings.ENV_VAR, str(f))
    c = settings.load()
    assert c.hypervisor.default_vcpus == 2 and c.hypervisor.boot_timeout == 10.0
    assert c.source == f


@pytest.mark.parametrize("text, message", [
    ("[hypervisor]\nfoo = 1\n", "unknown key hypervisor.foo"),
    ("[bogus]\n", r"unknown table \[bogus\]"),
    ("[hypervisor]\ndefault_vcpus = \"2\"\n", "hypervisor.default_vcpus must be of type int"),
    ("[hypervisor]\ndebug_console = 1\n", "must be of type bool"),
    ("[hypervisor]\ndefault_vcpus = true\n", "must be of type int"),
    ("[hypervisor]\naccelerator = \"xen\"\n", "accelerator must be one of"),
    ("[hypervisor]\ndefault_memory_mib = 1\n", "default_memory_mib=1 is outside"),
    ("[runtime]\nasset_dir = \"rel\"\n", "absolute path"),
    ("[hypervisor\n", "invalid TOML"),
])
def test_bad_files(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        settings.load(f)


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        settings.load(tmp_path / "nope.toml")
