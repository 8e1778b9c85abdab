"""The OCI seccomp profile (config-linux.md "seccomp") compiled to a classic BPF filter.

No libseccomp in the guest: the agent compiles the profile itself, at create time (so a
bad profile is an ``invalid`` reply naming the field), and the container's process
installs the program with seccomp(2) right before execve.

The program, for the native architecture (x86_64):

    load arch;  != AUDIT_ARCH_X86_64        -> KILL_PROCESS (another ABI, e.g. int 0x80)
    load nr;    >= 0x40000000 (x32 syscall) -> defaultAction if SCMP_ARCH_X32 is listed,
                                               else KILL_PROCESS
    for each rule, for each of its syscall names, in the profile's order:
        nr == N and every args condition holds -> the rule's action
    defaultAction

The first matching rule wins. Arguments are 64-bit: each condition compares the high
and the low word. Names of syscalls that exist only on other architectures (see
:mod:`hull.agent.syscall_table`) are skipped, as libseccomp does; a name known nowhere,
an unknown action, operator or architecture is an error naming it.
"""

from __future__ import annotations

import os
import struct

TYPE_CHECKING = False  # not typing's: the agent must not import typing (agentapi/records.py)
if TYPE_CHECKING:
    from typing import Any

AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000

# seccomp return values <linux/seccomp.h>
_RET_KILL_PROCESS = 0x80000000
_RET_KILL_THREAD = 0x00000000
_RET_TRAP = 0x00030000
_RET_ERRNO = 0x00050000
_RET_TRACE = 0x7FF00000
_RET_LOG = 0x7FFC0000
_RET_ALLOW = 0x7FFF0000
_EPERM = 1

# classic BPF opcodes
_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15
_JGT = 0x25
_JGE = 0x35
_AND = 0x54  # BPF_ALU | BPF_AND | BPF_K
_RET = 0x06
_MAX_INSNS = 4096

_ARCHES = frozenset({
    "SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32", "SCMP_ARCH_ARM",
    "SCMP_ARCH_AARCH64", "SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32",
    "SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64", "SCMP_ARCH_MIPSEL64N32", "SCMP_ARCH_PPC",
    "SCMP_ARCH_PPC64", "SCMP_ARCH_PPC64LE", "SCMP_ARCH_S390", "SCMP_ARCH_S390X",
    "SCMP_ARCH_PARISC", "SCMP_ARCH_PARISC64", "SCMP_ARCH_RISCV64", "SCMP_ARCH_LOONGARCH64",
    "SCMP_ARCH_M68K", "SCMP_ARCH_SH", "SCMP_ARCH_SHEB",
})
# seccomp(2) flags
FLAGS = {"SECCOMP_FILTER_FLAG_TSYNC": 1, "SECCOMP_FILTER_FLAG_LOG": 2,
         "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4, "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV": 0}


class SeccompError(ValueError):
    """The profile cannot be compiled; the message names the field."""


class Filter:
    """A compiled program and the seccomp(2) flags to install it with."""

    __slots__ = ("flags", "program")

    def __init__(self, program: bytes, flags: int) -> None:
        self.program = program  # struct sock_filter[]
        self.flags = flags


def _action(name: Any, errno_ret: Any, what: str) -> int:
    if errno_ret is not None and (not isinstance(errno_ret, int) or isinstance(errno_ret, bool)
                                  or not 0 <= errno_ret <= 0xFFFF):
        raise SeccompError(f"{what}: errnoRet must be an integer in [0, 65535]")
    if name == "SCMP_ACT_ALLOW":
        return _RET_ALLOW
    if name == "SCMP_ACT_ERRNO":
        return _RET_ERRNO | (_EPERM if errno_ret is None else errno_ret)
    if name in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD"):
        return _RET_KILL_THREAD
    if name == "SCMP_ACT_KILL_PROCESS":
        return _RET_KILL_PROCESS
    if name == "SCMP_ACT_TRAP":
        return _RET_TRAP
    if name == "SCMP_ACT_TRACE":
        return _RET_TRACE | (_EPERM if errno_ret is None else errno_ret)
    if name == "SCMP_ACT_LOG":
        return _RET_LOG
    if name == "SCMP_ACT_NOTIFY":
        raise SeccompError(f"{what}: SCMP_ACT_NOTIFY is not supported (no seccomp agent "
                           "in the guest)")
    raise SeccompError(f"{what}: unknown action {name!r}")


class _Asm:
    """Instructions with symbolic jump targets, resolved by :meth:`code`."""

    def __init__(self) -> None:
        self.insns: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int = 0, jt: int | str = 0, jf: int | str = 0) -> None:
        self.insns.append((code, jt, jf, k & 0xFFFFFFFF))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def code(self) -> bytes:
        if len(self.insns) > _MAX_INSNS:
            raise SeccompError(f"linux.seccomp: the profile compiles to {len(self.insns)} "
                               f"instructions, more than the kernel's {_MAX_INSNS}")
        out = bytearray()
        for pc, (code, jt, jf, k) in enumerate(self.insns):
            offsets = []
            for target in (jt, jf):
                off = target if isinstance(target, int) else self.labels[target] - pc - 1
                if not 0 <= off <= 255:
                    raise SeccompError("linux.seccomp: a rule is too large to compile")
                offsets.append(off)
            out += struct.pack("=HBBI", code, offsets[0], offsets[1], k)
        return bytes(out)


def _arg_check(asm: _Asm, cond: Any, what: str, fail: str, uid: str) -> None:
    if not isinstance(cond, dict):
        raise SeccompError(f"{what} must be an object")
    index, value, two = cond.get("index"), cond.get("value", 0), cond.get("valueTwo", 0)
    op = cond.get("op")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= 5:
        raise SeccompError(f"{what}.index must be an integer in [0, 5]")
    for name, v in (("value", value), ("valueTwo", two)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**64:
            raise SeccompError(f"{what}.{name} must be an unsigned 64-bit integer")
    lo_off, hi_off = 16 + 8 * index, 16 + 8 * index + 4  # little-endian args[index]
    v_hi, v_lo = value >> 32, value & 0xFFFFFFFF
    passed = f"pass{uid}"
    if op == "SCMP_CMP_EQ":
        asm.op(_LD_ABS, hi_off)
        asm.op(_JEQ, v_hi, 0, fail)
        asm.op(_LD_ABS, lo_off)
        asm.op(_JEQ, v_lo, 0, fail)
    elif op == "SCMP_CMP_MASKED_EQ":
        t_hi, t_lo = two >> 32, two & 0xFFFFFFFF
        asm.op(_LD_ABS, hi_off)
        asm.op(_AND, v_hi)
        asm.op(_JEQ, t_hi, 0, fail)
        asm.op(_LD_ABS, lo_off)
        asm.op(_AND, v_lo)
        asm.op(_JEQ, t_lo, 0, fail)
    elif op == "SCMP_CMP_NE":
        asm.op(_LD_ABS, hi_off)
        asm.op(_JEQ, v_hi, 0, passed)
        asm.op(_LD_ABS, lo_off)
        asm.op(_JEQ, v_lo, fail, 0)
    elif op in ("SCMP_CMP_GT", "SCMP_CMP_GE"):
        asm.op(_LD_ABS, hi_off)
        asm.op(_JGT, v_hi, passed, 0)
        asm.op(_JEQ, v_hi, 0, fail)
        asm.op(_LD_ABS, lo_off)
        asm.op(_JGT if op == "SCMP_CMP_GT" else _JGE, v_lo, 0, fail)
    elif op in ("SCMP_CMP_LT", "SCMP_CMP_LE"):
        asm.op(_LD_ABS, hi_off)
        asm.op(_JGT, v_hi, fail, 0)
        asm.op(_JEQ, v_hi, 0, passed)
        asm.op(_LD_ABS, lo_off)
        asm.op(_JGE if op == "SCMP_CMP_LT" else _JGT, v_lo, fail, 0)
    else:
        raise SeccompError(f"{what}.op: unknown operator {op!r}")
    asm.label(passed)


def compile_profile(profile: Any, what: str = "linux.seccomp",
                    machine: str | None = None) -> Filter:
    """The Filter for an OCI seccomp object; SeccompError names what is wrong.

    ``machine`` is the guest's ``uname -m`` (default: this one's); only x86_64 has a
    syscall table, any other is refused with a SeccompError.
    """
    from hull.agent import syscall_table

    if not isinstance(profile, dict):
        raise SeccompError(f"{what} must be an object")
    if machine is None:
        machine = os.uname().machine
    if machine != "x86_64":
        # The syscall table and the arch check below are x86_64's: refuse rather than
        # install a filter that would match the wrong syscalls (or silently run without).
        raise SeccompError(f"{what}: seccomp profiles are supported on x86_64 guests only, "
                           f"not on this {machine} guest (remove linux.seccomp)")
    default = _action(profile.get("defaultAction"), profile.get("defaultErrnoRet"),
                      f"{what}.defaultAction")
    arches = profile.get("architectures") or []
    if not isinstance(arches, list):
        raise SeccompError(f"{what}.architectures must be a list")
    for arch in arches:
        if arch not in _ARCHES:
            raise SeccompError(f"{what}.architectures: unknown architecture {arch!r}")
    flags = 0
    for flag in profile.get("flags") or []:
        if flag not in FLAGS:
            raise SeccompError(f"{what}.flags: unknown flag {flag!r}")
        flags |= FLAGS[flag]
    if profile.get("listenerPath"):
        raise SeccompError(f"{what}.listenerPath: seccomp notify is not supported")
    numbers, foreign = syscall_table.table(), syscall_table.foreign()
    asm = _Asm()
    asm.op(_LD_ABS, 4)  # seccomp_data.arch
    asm.op(_JEQ, AUDIT_ARCH_X86_64, 1, 0)
    asm.op(_RET, _RET_KILL_PROCESS)
    asm.op(_LD_ABS, 0)  # seccomp_data.nr
    asm.op(_JGE, _X32_BIT, 0, 1)
    asm.op(_RET, default if "SCMP_ARCH_X32" in arches else _RET_KILL_PROCESS)
    rules = profile.get("syscalls") or []
    if not isinstance(rules, list):
        raise SeccompError(f"{what}.syscalls must be a list")
    block = 0
    for i, rule in enumerate(rules):
        where = f"{what}.syscalls[{i}]"
        if not isinstance(rule, dict):
            raise SeccompError(f"{where} must be an object")
        names = rule.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str)
                                                               for n in names):
            raise SeccompError(f"{where}.names must be a non-empty list of strings")
        action = _action(rule.get("action"), rule.get("errnoRet"), f"{where}.action")
        conds = rule.get("args") or []
        if not isinstance(conds, list):
            raise SeccompError(f"{where}.args must be a list")
        for name in names:
            nr = numbers.get(name)
            if nr is None:
                if name in foreign:
                    continue
                raise SeccompError(f"{where}.names: unknown syscall {name!r}")
            block += 1
            nxt, fail = f"next{block}", f"fail{block}"
            asm.op(_JEQ, nr, 0, nxt)
            for j, cond in enumerate(conds):
                _arg_check(asm, cond, f"{where}.args[{j}]", fail, f"{block}.{j}")
            asm.op(_RET, action)
            if conds:
                asm.label(fail)
                asm.op(_LD_ABS, 0)  # the argument checks replaced nr in A
            asm.label(nxt)
    asm.op(_RET, default)
    return Filter(asm.code(), flags)
