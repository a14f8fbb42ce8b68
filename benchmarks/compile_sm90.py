"""Compiles the decode-selection kernels for sm_90 (H100/H200) on a machine without a GPU and
prints ptxas register use and spills: catches lowering errors that the Triton interpreter cannot.
Also compiles the variants without programmatic dependent launch and the measurement variants
of bench_select.py --phases (SELECT_UNTIL 1-3, no tile minimum). Usage, from the repository root: `PYTHONPATH=. python benchmarks/compile_sm90.py`.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sglang_tokenselect.kernels import triton_select as ts

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TIE_LISTS = ("key_a", "pos_a", "key_b", "pos_b")
BF16 = ("q_ptr", "cq_ptr", "k_ptr", "p_ptr")
I64 = ("seq_ptr", "rpi_ptr", "counter_ptr")
MEASUREMENT_VARIANTS = (("UNTIL", 1), ("UNTIL", 2), ("UNTIL", 3), ("TILE_MIN", False))
FP32 = ("vote_ptr", "tmax_ptr", "tmin_ptr", "tsum_ptr", "lse_ptr", "bounds_ptr")


def pointer_type(name: str) -> str:
    if name in BF16:
        return "*bf16"
    if name in I64:
        return "*i64"
    if name in FP32:
        return "*fp32"
    return "*i1" if name == "cvalid_ptr" else "*i32"


def compile_kernel(fn, consts: dict, num_warps: int, floats=("threshold", "scale")) -> None:
    names = list(fn.arg_names)
    sig = {n: "constexpr" if n in consts else pointer_type(n) if n.endswith("_ptr") or n in TIE_LISTS
           else "fp32" if n in floats else "i32" for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    varied = {k: v for k, v in consts.items() if k == "PDL" or (k, v) in MEASUREMENT_VARIANTS}
    print(fn.__name__, varied or "", "regs", getattr(kernel, "n_regs", "?"), "spills",
          getattr(kernel, "n_spills", "?"), "shared", kernel.metadata.shared)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    if consts.get("PDL"):
        assert "griddepcontrol.wait" in kernel.asm["ptx"], "PDL variant without griddepcontrol"
    usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    print(usage[-400:])
    os.unlink(f.name)


SELECT = dict(SPLIT=64, BLOCK_N=64, B_PAD=2, BLOCK=2048, LIST_MAX=4096, BITS=8, SOFT=True,
              CTR=ts.RADIX_COUNTERS, GATE_BLOCK=512, HEAD_DIM=128, FLAT_PAD=4096, UNTIL=4)
VOTE = dict(NUM_HEADS=32, H_PAD=32, H_CHUNK=4, VT=8, BLOCK_N=64, B_PAD=2, BITS=8, SOFT=True, CTR=ts.RADIX_COUNTERS)
LSE = dict(NUM_HEADS=32, HEADS=ts.LSE_HEADS, TILES=ts.LSE_TILES, BLOCK_N=64, B_PAD=2)
GATE = dict(HEAD_DIM=128, FLAT_PAD=4096, BLOCK=512, SPLIT=4, RADIX_WORDS=ts.RADIX_WORDS, CTR=ts.RADIX_COUNTERS)
SCORE = dict(NUM_KV=8, NUM_HEADS=32, GROUP=4, G_PAD=16, HEAD_DIM=128, BLOCK_N=64, B_PAD=2, STAGES=3,
             SUM_VOTE=False, DOT_F32=False, TILE_MIN=True)

if __name__ == "__main__":
    for pdl in (True, False):  # on sm_90 the launcher uses programmatic dependent launch
        compile_kernel(ts._select_kernel, dict(SELECT, PDL=pdl), 8)
        compile_kernel(ts._vote_kernel, dict(VOTE, PDL=pdl), 4)
        compile_kernel(ts._lse_kernel, dict(LSE, PDL=pdl), 4)
        compile_kernel(ts._gate_kernel, dict(GATE, PDL=pdl), 4)
        compile_kernel(ts._score_kernel, dict(SCORE, PDL=pdl), 4)
    for until in (3, 2, 1):
        compile_kernel(ts._select_kernel, dict(SELECT, UNTIL=until, PDL=True), 8)
    compile_kernel(ts._score_kernel, dict(SCORE, TILE_MIN=False, PDL=True), 4)
