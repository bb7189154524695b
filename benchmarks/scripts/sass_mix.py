"""Static instruction mix of CUDA kernels from an nvdisasm listing: how many SASS instructions each kernel's main loop
spends per unit of work, without a GPU (session 30 used it to cut the NF4 decode GEMV's instructions per weight
before any device time).

    nvcc -cubin csrc/nf4_gemv.cu -o k.cubin -arch=sm_90 -std=c++17 -O3 -I<torch include dirs> -Icsrc -DWITH_CUDA
    nvdisasm -c k.cubin > k.sass          # nvdisasm: the CUDA toolkit, or pip's nvidia-cuda-nvdisasm wheel
    python benchmarks/scripts/sass_mix.py k.sass --kernel nf4_mma_gemv_kernel --anchor HMMA --work 128

For every kernel whose (mangled) name contains ``--kernel``, the span from its first to its last ``--anchor``
instruction (a main loop's tensor-core ops, say) is counted by opcode; ``--work`` divides the span's length (the NF4
GEMV's span covers two 128-weight segments of 2 x 16 bytes per lane: 128 weights per lane). Static counts: a
loop body executed once per iteration, branches not weighted.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
from typing import Dict, List

_INSTRUCTION = re.compile(r"\s+/\*[0-9a-f]{4}\*/\s*(.*?)\s*;")


def kernels(listing: str) -> Dict[str, List[str]]:
    """{mangled kernel name: its instructions' text, in order} from nvdisasm's ``-c`` output."""
    out: Dict[str, List[str]] = {}
    for section in re.split(r"//-+ \.text\.", listing)[1:]:
        name = section.split()[0]
        out[name] = [m.group(1) for m in map(_INSTRUCTION.match, section.split("\n")) if m]
    return out


def opcode(instruction: str) -> str:
    """The instruction's opcode with its modifiers (``IMAD.MOV.U32``), predicate dropped."""
    words = instruction.split()
    return words[1] if words[0].startswith("@") else words[0]


def loop_mix(instructions: List[str], anchor: str) -> dict:
    """Counts over the span from the first to the last instruction whose opcode starts with ``anchor``."""
    ops = [opcode(i) for i in instructions if i.split()]
    marks = [k for k, o in enumerate(ops) if o.startswith(anchor)]
    span = ops[marks[0]:marks[-1] + 1] if marks else []
    return {"static": len(ops), "anchors": len(marks), "span": len(span),
            "moves": sum(1 for o in span if o.startswith("IMAD.MOV") or o == "MOV"),
            "by_opcode": collections.Counter(o.split(".")[0] for o in span)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("listing", help="nvdisasm -c output")
    ap.add_argument("--kernel", required=True, help="substring of the kernels' mangled names")
    ap.add_argument("--anchor", default="HMMA", help="opcode prefix that marks the main loop's span (default HMMA)")
    ap.add_argument("--work", type=float, default=1.0, help="units of work in the span, to report instructions per unit")
    a = ap.parse_args(argv)
    with open(a.listing) as f:
        found = {name: body for name, body in kernels(f.read()).items() if a.kernel in name}
    if not found:
        print(f"no kernel name contains {a.kernel!r}", file=sys.stderr)
        return 1
    for name, body in found.items():
        mix = loop_mix(body, a.anchor)
        print(f"{name}\n  static {mix['static']}, {a.anchor} {mix['anchors']}, span {mix['span']} "
              f"({mix['span'] / a.work:.2f} per unit of work), register moves {mix['moves']}")
        print("  " + ", ".join(f"{k} {v}" for k, v in mix["by_opcode"].most_common(14)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
