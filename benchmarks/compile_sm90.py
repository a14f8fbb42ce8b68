"""Compiles the decode-selection kernels for sm_90 (H100/H200) on a machine without a GPU and prints
ptxas register use: catches lowering errors that the Triton interpreter cannot. Usage, from the
repository root: `PYTHONPATH=. python benchmarks/compile_sm90.py`."""
import os, subprocess, sys, tempfile
import triton
BIN = os.path.dirname(triton.__file__) + "/backends/nvidia/bin/"
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sglang_tokenselect.kernels import triton_select as ts

def compile_kernel(fn, sig, consts, num_warps):
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    print(fn.__name__, "ok", "regs", getattr(k, "n_regs", "?"), "spills", getattr(k, "n_spills", "?"),
          "shared", k.metadata.shared)
    f = tempfile.NamedTemporaryFile(suffix=".cubin", delete=False); f.write(k.asm["cubin"]); f.close()
    print(subprocess.run([BIN + "cuobjdump", "--dump-resource-usage", f.name], capture_output=True, text=True).stdout[-400:])
    return k

names = list(ts._select_kernel.arg_names)
ptr_i32 = "*i32"
sig = {}
types = dict(vote_ptr="*fp32", cq_ptr="*bf16", q_ptr="*bf16", counter_ptr="*i64", cvalid_ptr="*i1",
             seq_ptr="*i64", rpi_ptr="*i64")
consts = dict(SPLIT=64, BLOCK_N=64, B_PAD=2, BLOCK=2048, LIST_MAX=4096, BITS=8,
              SOFT=True, CTR=ts.RADIX_COUNTERS, GATE_BLOCK=512, HEAD_DIM=128, FLAT_PAD=4096)
for n in names:
    if n in consts:
        sig[n] = "constexpr"
    elif n.endswith("_ptr") or n in ("key_a", "pos_a", "key_b", "pos_b"):
        sig[n] = types.get(n, ptr_i32)
    else:
        sig[n] = "i32"
compile_kernel(ts._select_kernel, sig, {(names.index(k),): v for k, v in consts.items()}, 8)

names = list(ts._vote_kernel.arg_names)
consts = dict(NUM_HEADS=32, H_PAD=32, H_CHUNK=4, VT=8, BLOCK_N=64, B_PAD=2, BITS=8, SOFT=True, CTR=ts.RADIX_COUNTERS)
types = dict(p_ptr="*bf16", tmax_ptr="*fp32", lse_ptr="*fp32", vote_ptr="*fp32", seq_ptr="*i64")
sig = {n: ("constexpr" if n in consts else types.get(n, ptr_i32) if n.endswith("_ptr") else "i32") for n in names}
compile_kernel(ts._vote_kernel, sig, {(names.index(k),): v for k, v in consts.items()}, 4)
import subprocess, tempfile
for kern in (ts._select_kernel,):
    pass

names = list(ts._lse_kernel.arg_names)
consts = dict(NUM_HEADS=32, HEADS=ts.LSE_HEADS, TILES=ts.LSE_TILES, BLOCK_N=64, B_PAD=2)
types = dict(tmax_ptr="*fp32", tsum_ptr="*fp32", lse_ptr="*fp32", seq_ptr="*i64")
sig = {n: ("constexpr" if n in consts else types.get(n, ptr_i32) if n.endswith("_ptr") else "i32") for n in names}
compile_kernel(ts._lse_kernel, sig, {(names.index(k),): v for k, v in consts.items()}, 4)

names = list(ts._gate_kernel.arg_names)
consts = dict(HEAD_DIM=128, FLAT_PAD=4096, BLOCK=512, SPLIT=4, RADIX_WORDS=ts.RADIX_WORDS, CTR=ts.RADIX_COUNTERS)
types = dict(q_ptr="*bf16", cq_ptr="*bf16", seq_ptr="*i64", rpi_ptr="*i64", counter_ptr="*i64", cvalid_ptr="*i1")
sig = {n: ("constexpr" if n in consts else types.get(n, ptr_i32) if n.endswith("_ptr") else ("fp32" if n == "threshold" else "i32")) for n in names}
compile_kernel(ts._gate_kernel, sig, {(names.index(k),): v for k, v in consts.items()}, 4)
names = list(ts._score_kernel.arg_names)
consts = dict(NUM_KV=8, NUM_HEADS=32, GROUP=4, G_PAD=16, HEAD_DIM=128, BLOCK_N=64, B_PAD=2, STAGES=3, SUM_VOTE=False, DOT_F32=False)
types = dict(q_ptr="*bf16", k_ptr="*bf16", seq_ptr="*i64", rpi_ptr="*i64", p_ptr="*bf16", tmax_ptr="*fp32", tmin_ptr="*fp32", tsum_ptr="*fp32", vote_ptr="*fp32")
sig = {n: ("constexpr" if n in consts else types.get(n, ptr_i32) if n.endswith("_ptr") else ("fp32" if n == "scale" else "i32")) for n in names}
compile_kernel(ts._score_kernel, sig, {(names.index(k),): v for k, v in consts.items()}, 4)
