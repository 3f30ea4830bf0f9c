"""The vSensor's filter as a part that only drops what it has read: bounds checks before loads.

The vSensor hands out a libpcap expression (``not (host V and tcp port P)``: the sensor's own
uploads). Compiled into one program with the user's ``BPF``, a load past the end of a frame
rejects the frame: a 33-byte frame whose IPv4 header is cut short was dropped because ``host``
reads both addresses, while tcpdump and the ``file`` transport keep it. A libpcap expression
cannot say "too short for me" in a way that holds on every link type (``len`` counts the link
header, and the vSensor does not know the sensor's link types), so the sensor compiles the
vSensor's expression alone and rewrites its program here:

* before every packet load (``ld``/``ldh``/``ldb`` absolute or indexed, ``ldx 4*([k]&0xf)``),
  a check that the bytes are there; when they are not, a jump past the part: the frame is kept,
  and the user's program after it decides;
* ``ret #0`` stays a drop; every accept becomes that same jump.

The result is AND-ed in front of the user's program (whose jumps are relative, so it is
appended unchanged), behind the peer exclusion. Ancillary loads (``SKF_AD_*``, negative
offsets) read no packet bytes and are left alone. Scratch slot 15 saves A around a
``ldx 4*([k]&0xf)`` check; a program that uses slot 15 itself is refused (libpcap reaches it only
for very large expressions).
"""

from __future__ import annotations

from ossensor_core.capture.bpf import BPF_MAXINSNS, BpfProgram, combine_filters, compile_filter
from ossensor_core.capture.bpfasm import (ALU_SUB_X, JA, JGE_K, JGE_X, JGT_K, LD_MEM, LD_W_LEN,
                                          LDX_B_MSH, RET_A, RET_K, ST, Asm)
from ossensor_core.errors import FilterError

_SCRATCH = 15
_SIZES = {0x00: 4, 0x08: 2, 0x10: 1}  # BPF_W, BPF_H, BPF_B
_ABS, _IND, _MEM = 0x20, 0x40, 0x60
_ANCILLARY = 0x80000000  # k at or above: SKF_AD_*, SKF_NET_OFF, SKF_LL_OFF (no bounds to check)


def _uses_scratch(code: int, k: int) -> bool:
    cls = code & 0x07
    if cls in (0x02, 0x03):  # st, stx
        return k == _SCRATCH
    return cls in (0x00, 0x01) and code & 0xE0 == _MEM and k == _SCRATCH


def bounded_code(program: BpfProgram) -> list[tuple[int, int, int, int]]:
    """``program`` rewritten as the first part of an AND (see the module docstring): drops only
    what it read whole, and jumps past its own end for everything else."""
    asm = Asm()
    end = "END"
    insns = program.instructions
    labels = [asm.new("O") for _ in insns]
    for i, (code, jt, jf, k) in enumerate(insns):
        if _uses_scratch(code, k):
            raise FilterError(f"filter {program.expression!r} uses scratch slot {_SCRATCH}, "
                              "which the bounds checks need")
        asm.mark(labels[i])
        cls, mode, size = code & 0x07, code & 0xE0, _SIZES.get(code & 0x18, 0)
        if cls == 0x00 and mode == _ABS and k < _ANCILLARY:
            asm.op(LD_W_LEN)  # A is overwritten by the load anyway
            asm.op(JGE_K, k + size, 1, 0)
            asm.op(JA, end)
        elif cls == 0x00 and mode == _IND and k < _ANCILLARY:
            asm.op(LD_W_LEN)
            asm.op(JGE_X, 0, 0, 2)  # X beyond the frame: len - X would wrap around
            asm.op(ALU_SUB_X)
            asm.op(JGE_K, k + size, 1, 0)
            asm.op(JA, end)
        elif code == LDX_B_MSH and k < _ANCILLARY:
            asm.op(ST, _SCRATCH)  # A may be live across ldx
            asm.op(LD_W_LEN)
            asm.op(JGE_K, k + 1, 1, 0)
            asm.op(JA, end)
            asm.op(LD_MEM, _SCRATCH)
        if cls == 0x06:  # ret
            if code == RET_K and k == 0:
                asm.op(RET_K, 0)
            elif code == RET_A:
                asm.op(JGT_K, 0, 0, 1)
                asm.op(JA, end)
                asm.op(RET_K, 0)
            else:
                asm.op(JA, end)
            continue
        if code == JA:
            asm.op(JA, labels[i + 1 + k])
        elif cls == 0x05:
            asm.op(code, k, labels[i + 1 + jt], labels[i + 1 + jf])
        else:
            asm.op(code, k, jt, jf)
    # A rewritten jump that no longer reaches (over 255) raises FilterError in resolve.
    return asm.resolve(end)


def bounded_and(first: BpfProgram, rest: BpfProgram, what: str = "the vSensor's filter"
                ) -> BpfProgram:
    """``first`` (bounded: frames too short for it are left to ``rest``) AND ``rest``; raises
    FilterError when the whole exceeds the kernel's limit or a jump no longer reaches."""
    if not first.expression:
        return rest
    code = bounded_code(first)
    total = len(code) + len(rest)
    if total > BPF_MAXINSNS:
        raise FilterError(f"{what} takes {len(code)} BPF instructions with its "
                          f"bounds checks, with the rest of the filter ({len(rest)}) {total}: "
                          f"more than the kernel's limit of {BPF_MAXINSNS}")
    expression = f"(bounded: {first.expression})"
    if rest.expression:
        expression += f" and ({rest.expression})"
    return BpfProgram(expression, first.linktype, tuple(code) + rest.instructions)


def _with_placement(placement: str, rest: BpfProgram, linktype: int,
                    notes: list[str]) -> BpfProgram:
    """The interface's single-copy rule (``node/placement.py``), bounded, before ``rest``; left
    out, with a note, when it does not compile or fit: the interface then keeps every copy."""
    if not placement:
        return rest
    try:
        return bounded_and(compile_filter(placement, linktype), rest, "the single-copy rule")
    except FilterError as exc:
        notes.append(f"the single-copy rule is left out (this interface keeps every copy): "
                     f"{exc}")
        return rest


def fit_bounded(vsensor: str, user: str, linktype: int,
                placement: str = "") -> tuple[BpfProgram, str]:
    """``(vsensor) and (placement) and (user)`` for ``linktype``: the first two bounded
    (:func:`bounded_and`) when they can be, else the vSensor's as one libpcap program with the
    user's, as before (a long expression whose rewritten jumps no longer reach, or that no
    longer fits): never a filter refused only for its bounds checks. Returns the program and a
    note saying what is left out and why ("" when nothing is). FilterError when the vSensor's
    or the user's expression does not compile."""
    notes: list[str] = []
    first = compile_filter(vsensor, linktype)
    rest = _with_placement(placement, compile_filter(user, linktype), linktype, notes)
    try:
        return bounded_and(first, rest), "; ".join(notes)
    except FilterError as exc:
        notes.append(f"the vSensor's filter is applied without bounds checks (frames too "
                     f"short for it are dropped): {exc}")
        combined = _with_placement(placement, compile_filter(combine_filters(vsensor, user),
                                                             linktype), linktype, [])
        return combined, "; ".join(notes)
