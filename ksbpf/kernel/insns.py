"""BPF instructions built by hand, for the few programs ksbpf makes without
a compiler (the --deny-tun device program, the raw-socket LSM programs):
the opcodes they use, one instruction, and a small assembler with named
jump targets."""

from __future__ import annotations

import struct

_INSN = struct.Struct("=BBhi")

LDXW, LDXH, LDXDW = 0x61, 0x69, 0x79          # BPF_LDX | BPF_MEM | size
LD_IMM64 = 0x18                               # BPF_LD | BPF_IMM | BPF_DW (two slots)
MOV64_K, MOV64_X, AND64_K = 0xB7, 0xBF, 0x57  # BPF_ALU64 | op | source
JA = 0x05                                     # BPF_JMP | BPF_JA
JEQ_K, JNE_K, JEQ_X, JNE_X = 0x15, 0x55, 0x1D, 0x5D   # BPF_JMP | op | source
JEQ32_K, JNE32_K = 0x16, 0x56                 # BPF_JMP32 | op | BPF_K
CALL, EXIT = 0x85, 0x95


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return _INSN.pack(code, (src << 4) | dst, off, imm)


class Asm:
    """Instructions with named jump targets (a jump's offset counts the
    slots between it and its label; a 64-bit immediate takes two)."""

    def __init__(self):
        self.items: list = []

    def op(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> "Asm":
        self.items.append(insn(code, dst, src, off, imm))
        return self

    def imm64(self, dst: int, value: int) -> "Asm":
        value &= (1 << 64) - 1
        lo, hi = value & 0xFFFFFFFF, value >> 32
        self.items.append(insn(LD_IMM64, dst, 0, 0, struct.unpack("=i", struct.pack("=I", lo))[0])
                          + insn(0, 0, 0, 0, struct.unpack("=i", struct.pack("=I", hi))[0]))
        return self

    def jump(self, code: int, label: str, dst: int = 0, src: int = 0, imm: int = 0) -> "Asm":
        self.items.append((code, dst, src, imm, label))
        return self

    def label(self, name: str) -> "Asm":
        self.items.append(name)
        return self

    def build(self) -> bytes:
        at, slot = {}, 0
        for item in self.items:
            if isinstance(item, str):
                at[item] = slot
            else:
                slot += len(item) // 8 if isinstance(item, bytes) else 1
        out, slot = [], 0
        for item in self.items:
            if isinstance(item, str):
                continue
            if isinstance(item, tuple):
                code, dst, src, imm, label = item
                item = insn(code, dst, src, at[label] - slot - 1, imm)
            out.append(item)
            slot += len(item) // 8
        return b"".join(out)
