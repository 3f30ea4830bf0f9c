"""A small classic BPF assembler with symbolic forward jumps, for the code the sensor generates
(the peer exclusion, the bounds checks around the vSensor's program). Opcodes from
linux/filter.h and linux/bpf_common.h."""

from __future__ import annotations

from dataclasses import dataclass

from ossensor_core.errors import FilterError

Insn = tuple[int, int, int, int]  # code, jt, jf, k

LD_W_ABS, LD_H_ABS, LD_B_ABS = 0x20, 0x28, 0x30
LD_W_IND, LD_H_IND, LD_B_IND = 0x40, 0x48, 0x50
LDX_B_MSH = 0xB1
LD_W_LEN = 0x80
LD_MEM, LDX_MEM, LDX_IMM = 0x60, 0x61, 0x01
ST, ALU_AND_K, ALU_ADD_K, ALU_SUB_X = 0x02, 0x54, 0x04, 0x1C
TAX, TXA = 0x07, 0x87
JA, JEQ_K, JGT_K, JGE_K = 0x05, 0x15, 0x25, 0x35
JEQ_X, JGT_X, JGE_X = 0x1D, 0x2D, 0x3D
RET_K, RET_A = 0x06, 0x16


@dataclass
class _Insn:
    code: int
    k: int | str = 0  # ja: a label
    jt: int | str = 0
    jf: int | str = 0


class Asm:
    """Instructions with jumps to labels, resolved to offsets at the end (forward only)."""

    def __init__(self) -> None:
        self.code: list[_Insn] = []
        self.labels: dict[str, int] = {}
        self.used: set[str] = set()  # labels jumped to
        self._n = 0

    def new(self, hint: str = "L") -> str:
        self._n += 1
        return f"{hint}{self._n}"

    def mark(self, label: str) -> None:
        self.labels[label] = len(self.code)

    def op(self, code: int, k: int | str = 0, jt: int | str = 0, jf: int | str = 0) -> None:
        self.used.update(x for x in (k, jt, jf) if isinstance(x, str))
        self.code.append(_Insn(code, k, jt, jf))

    def resolve(self, end: str) -> list[tuple[int, int, int, int]]:
        self.labels[end] = len(self.code)
        out = []
        for i, insn in enumerate(self.code):
            k, jt, jf = insn.k, insn.jt, insn.jf
            if insn.code == JA:
                k = self._offset(i, k, 1 << 32)
            elif insn.code & 0x07 == 0x05:  # conditional jump
                jt, jf = self._offset(i, jt, 256), self._offset(i, jf, 256)
            out.append((insn.code, int(jt), int(jf), int(k) & 0xFFFFFFFF))
        return out

    def _offset(self, i: int, target: int | str, limit: int) -> int:
        if isinstance(target, int):
            return target
        offset = self.labels[target] - i - 1
        if not 0 <= offset < limit:  # a bug in the generator, never a property of the input
            raise FilterError(f"generated BPF jump {offset} out of range")
        return offset
