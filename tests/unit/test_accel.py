import struct
from pathlib import Path

import pytest

from hull.errors import HypervisorError
from hull.hypervisor import accel
from hull.hypervisor.base import Accel

NO_VIRT = "processor: 0\nflags\t\t: fpu vme de pse tsc hypervisor\n"
VIRT = "processor: 0\nflags\t\t: fpu vme vmx tsc\n"


def test_cpu_flags() -> None:
    assert not accel.cpu_has_virt(NO_VIRT)
    assert accel.cpu_has_virt(VIRT)
    assert accel.cpu_has_virt("flags : svm")


def test_no_virt_flags_means_tcg_without_touching_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("must not probe /dev/kvm or boot")

    monkeypatch.setattr(accel, "kvm_device_works", boom)
    monkeypatch.setattr(accel, "test_boot", boom)
    decision = accel.probe("qemu", cpuinfo=NO_VIRT)
    assert decision.accel is Accel.TCG and "vmx" in decision.reason


def test_kvm_only_after_a_test_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "kvm_device_works", lambda *a: None)
    monkeypatch.setattr(accel, "test_boot", lambda *a: "a test boot under KVM did not finish")
    assert accel.probe("qemu", cpuinfo=VIRT).accel is Accel.TCG
    monkeypatch.setattr(accel, "test_boot", lambda *a: None)
    assert accel.probe("qemu", cpuinfo=VIRT).accel is Accel.KVM


def test_policy_and_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []

    def fake_probe(qemu: str, cpuinfo: str | None = None) -> accel.Decision:
        calls.append(qemu)
        return accel.Decision(Accel.TCG, "no vmx")

    monkeypatch.setattr(accel, "probe", fake_probe)
    assert accel.choose("tcg", "q", tmp_path / "a.json").accel is Accel.TCG
    assert calls == []
    accel.choose("auto", "q", tmp_path / "a.json")
    accel.choose("auto", "q", tmp_path / "a.json")
    assert calls == ["q"]  # the second call used the cache
    with pytest.raises(HypervisorError, match="requires KVM"):
        accel.choose("kvm", "q", tmp_path / "a.json")


def test_probe_payload_is_a_pvh_elf() -> None:
    elf = accel.pvh_probe_payload()
    assert elf[:4] == b"\x7fELF" and elf[4] == 1  # 32-bit
    entry = struct.unpack_from("<I", elf, 24)[0]
    assert b"Xen\0" in elf
    note_entry = struct.unpack_from("<I", elf, elf.index(b"Xen\0") + 4)[0]
    assert note_entry == entry
