#!/usr/bin/env bash
# Runs ON the offline GPU host, from the repository root, after ../shared/gpu's four install
# chunks put SGLang 0.5.17 into /tmp/site (see benchmarks/README.md). Writes under $OUT.
#   bash benchmarks/gpu_session.sh STEP [STEP ...]   (GPU_DIR: the carried .gpu folder, default .gpu)
# Steps: env, smol-part1, smol-part2, gputests, select, select-quick, e2e, e2e-nocg, e2e-quick, accuracy,
#        extrapolation, jit-save, jit-restore, e2e-bs1-a, e2e-bs1-b, e2e-tput-a, e2e-tput-b, e2e-tput, soak,
#        prefill-bs1, prefill-tput, extrap-speed
#
# One device command may run 10 minutes and brings back at most 8 files from $OUT (this
# script always writes pip.log and one log per step): run each e2e-* step in its own command
# (timeout_s 600) and jit-save alone. Time estimates below are for a warm H200 (FlashInfer
# compiled, server start ~70 s); the bench's --time-budget (E2E_BUDGET, default 540 s) bounds
# each run and records what did not fit as skipped.
#
# Fresh machine: the first server start JIT-compiles FlashInfer for >4 minutes. Either run
# `jit-restore` first (needs the parts saved by an earlier `jit-save`, carried as
# .gpu/fi_cache/part*), or let the first e2e step absorb it (start limit 480 s, later
# backends keep >=150 s; the first backend's phases shrink accordingly).
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . >"$OUT/pip.log" 2>&1 \
  || { cat "$OUT/pip.log"; exit 1; }
GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
GPU_DIR=${GPU_DIR:-.gpu}
PREV=/tmp/e2e_prev            # JSONs kept between commands on a warm machine
BS1_CONTEXTS=4096,32768,131072,262144
BS1_CTX_LEN=266240            # 260K: 262144 prompt + 128 decode tokens fit; model config says 131072
TPUT=${TPUT:-32x24576,64x8192}  # env TPUT overrides
JIT_PART_BYTES=15000000       # at most 15 MB a part (16 MiB is the per-file limit)
JIT_MAX_PARTS=6               # + pip.log + jit_save.log = the 8 files a command brings back
status=0

step() {
  local name=$1; shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 40
  local rc=${PIPESTATUS[0]}
  echo "=== $name rc=$rc in $((SECONDS - start)) s"
  [ "$rc" = 0 ] || status=1
}

# Path of an earlier JSON named $1 (bs1.json, tput.json): $E2E_PREV if set, else this machine's
# /tmp/e2e_prev/$1, else a carried $GPU_DIR/prev/$1; empty (with a note) if none exists.
prev_json() {
  local p
  for p in "${E2E_PREV:-}" "$PREV/$1" "$GPU_DIR/prev/$1"; do
    [ -n "$p" ] && [ -f "$p" ] && { echo "$p"; return; }
  done
  echo "note: no earlier $1 (machine not warm? carry it as $GPU_DIR/prev/$1); running without --compare-with" >&2
}

# e2e_bench.py with the bs=1 long-context settings (4K..256K, 128 decode tokens, prefill graphs off).
e2e_bs1() {
  python3 benchmarks/e2e_bench.py --out-dir "$OUT" --phases warmup,long_context \
    --contexts "$BS1_CONTEXTS" --decode-tokens 128 --context-length "$BS1_CTX_LEN" \
    --extra-server-args "--disable-prefill-cuda-graph" --time-budget "${E2E_BUDGET:-540}" "$@"
}

# e2e_bench.py with the throughput settings (32x24K and 64x8K streams, 128 decode tokens each;
# 64 running requests; 8K prefill chunks, so SGLang reserves less activation memory and the KV
# pool holds 32 x 24K (~0.79M tokens) with room to spare).
e2e_tput() {
  python3 benchmarks/e2e_bench.py --out-dir "$OUT" --phases warmup,throughput \
    --throughput "$TPUT" --throughput-decode-tokens 128 \
    --common-server-args "--max-running-requests 64 --chunked-prefill-size 8192" \
    --extra-server-args "--disable-prefill-cuda-graph" --time-budget "${E2E_BUDGET:-540}" "$@"
}

keep() { mkdir -p "$PREV" && cp "$OUT/e2e.json" "$PREV/$1"; }

# One server under the Locust load test (benchmarks/soak.py; locust comes from .gpu/c5, installed
# by `bash .gpu/c5/install.sh` in the same or an earlier command). Environment:
#   SOAK_BACKEND  tokenselect (default) or flashinfer (or a label such as tokenselect@t0.9)
#   SOAK_TIME     Locust run time (default 5m; shortened to fit SOAK_BUDGET after a slow start)
#   SOAK_USERS    concurrent users (default 32)
#   SOAK_EXTRA    extra server args, e.g. "--max-total-tokens 200000" (the retraction run)
#   SOAK_NAME     run name (default: the backend): $OUT/soak_<name>.tar.gz and soak_<name>.json
#   SOAK_BUDGET   seconds for all of it (default 540), SOAK_ARGS: more soak.py arguments
# The server's PID is kept in $SOAK_PID while it runs: stopped by soak.py (also on SIGTERM) and,
# should soak.py itself be killed, by the EXIT trap below.
SOAK_PID=/tmp/soak_server.pid
soak() {
  rm -f "$SOAK_PID"
  python3 benchmarks/soak.py --backend "${SOAK_BACKEND:-tokenselect}" --time "${SOAK_TIME:-5m}" \
    --users "${SOAK_USERS:-32}" --extra-server-args="${SOAK_EXTRA:-}" ${SOAK_NAME:+--name "$SOAK_NAME"} \
    --time-budget "${SOAK_BUDGET:-540}" --out-dir "$OUT" --pid-file "$SOAK_PID" ${SOAK_ARGS:-}
}
stop_soak_server() {
  local pid
  pid=$(cat "$SOAK_PID" 2>/dev/null) && [ -n "$pid" ] && kill -KILL -- "-$pid" 2>/dev/null \
    && echo "killed the soak server's process group $pid"
  rm -f "$SOAK_PID"
}
trap stop_soak_server EXIT

# Compiled JIT kernels -> $OUT/fi_cache/part0.. (tar.xz, or .gz without xz, split in 15 MB parts):
#  * FlashInfer 0.6.15: ${FLASHINFER_WORKSPACE_BASE:-$HOME}/.cache/flashinfer/<arch>/cached_ops/<name>/<name>.so
#    (flashinfer/jit/env.py), saved as flashinfer_aot/<name>/<name>.so: restored into flashinfer's
#    AOT folder (<package>/data/aot, used when flashinfer-jit-cache is not installed), whose
#    modules load without ninja (a restored JIT folder would be rebuilt: pip-installed headers
#    are newer than the saved objects).
#  * SGLang's own JIT kernels: ${TVM_FFI_CACHE_DIR:-$HOME/.cache/tvm-ffi}/<dir>/<module>.so, loaded
#    directly when present (sglang/kernels/jit/utils/compile.py).
jit_save() {
  local fi_base=${FLASHINFER_WORKSPACE_BASE:-$HOME}/.cache/flashinfer
  local tvm=${TVM_FFI_CACHE_DIR:-$HOME/.cache/tvm-ffi}
  local stage=/tmp/jit_stage dest=$OUT/fi_cache so name n_fi=0 n_tvm=0
  rm -rf "$stage" "$dest"; mkdir -p "$stage/flashinfer_aot" "$stage/tvm-ffi" "$dest"
  while IFS= read -r so; do
    name=$(basename "$(dirname "$so")")
    [ "$(basename "$so")" = "$name.so" ] || continue
    mkdir -p "$stage/flashinfer_aot/$name" && cp "$so" "$stage/flashinfer_aot/$name/" && n_fi=$((n_fi + 1))
  done < <(find "$fi_base" -path '*/cached_ops/*' -name '*.so' 2>/dev/null)
  if [ -d "$tvm" ]; then
    while IFS= read -r so; do
      mkdir -p "$stage/tvm-ffi/$(dirname "$so")" && cp "$tvm/$so" "$stage/tvm-ffi/$so" && n_tvm=$((n_tvm + 1))
    done < <(cd "$tvm" && find . -mindepth 2 -maxdepth 2 -name '*.so' | sed 's|^\./||')
  fi
  echo "JIT modules: $n_fi FlashInfer (from $fi_base), $n_tvm tvm-ffi (from $tvm); uncompressed $(du -sb "$stage" | cut -f1) bytes"
  [ $((n_fi + n_tvm)) -gt 0 ] || { echo "nothing compiled yet: run a server first"; return 1; }
  local comp="gzip -6"; command -v xz >/dev/null && comp="xz -T0 -6"
  tar -C "$stage" -cf - . | $comp | split -b "$JIT_PART_BYTES" -d -a 1 - "$dest/part" || return 1
  local total nparts
  total=$(cat "$dest"/part* | wc -c); nparts=$(ls "$dest"/part* | wc -l)
  echo "compressed ($comp): $total bytes in $nparts part(s) of <= $JIT_PART_BYTES bytes"
  if [ "$nparts" -gt "$JIT_MAX_PARTS" ]; then
    echo "too big: more than $JIT_MAX_PARTS parts; nothing saved"; rm -rf "$dest"; return 1
  fi
  [ "$total" -le 55000000 ] || echo "warning: $total bytes leave little of the 64 MiB a command can carry"
  (cd "$dest" && sha256sum part*)
  echo "bring back $OUT/fi_cache/part*; later: copy them to $GPU_DIR/fi_cache/, carry $GPU_DIR/fi_cache and run jit-restore"
}

# $JIT_CACHE_SRC (default $GPU_DIR/fi_cache)/part* -> FlashInfer AOT folder and tvm-ffi cache.
jit_restore() {
  local src=${JIT_CACHE_SRC:-$GPU_DIR/fi_cache} stage=/tmp/jit_restore fi_pkg tvm magic dec
  ls "$src"/part* >/dev/null 2>&1 || { echo "no $src/part*: nothing to restore"; return 1; }
  fi_pkg=$(python3 -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("flashinfer").origin))') \
    || { echo "flashinfer not importable"; return 1; }
  tvm=${TVM_FFI_CACHE_DIR:-$HOME/.cache/tvm-ffi}
  magic=$(head -c 2 "$src/part0" | od -An -tx1 | tr -d ' \n')
  dec="xz -dc"; [ "$magic" = "1f8b" ] && dec="gzip -dc"
  rm -rf "$stage"; mkdir -p "$stage"
  cat "$src"/part* | $dec | tar -x -C "$stage" || { echo "corrupt or incomplete parts in $src"; return 1; }
  mkdir -p "$fi_pkg/data/aot" "$tvm"
  cp -r "$stage/flashinfer_aot/." "$fi_pkg/data/aot/" && cp -r "$stage/tvm-ffi/." "$tvm/" || return 1
  echo "restored $(ls "$stage/flashinfer_aot" | wc -l) FlashInfer modules into $fi_pkg/data/aot," \
       "$(ls "$stage/tvm-ffi" | wc -l) tvm-ffi modules into $tvm"
}

for s in "$@"; do
  case $s in
    env) step env bash -c 'nvidia-smi; python3 -c "import torch, triton, sglang, flashinfer; print(torch.__version__, triton.__version__, sglang.__version__, flashinfer.__version__, torch.cuda.get_device_name())"' ;;
    smol-part1) mkdir -p /tmp/smol && cp "$GPU_DIR/smol1/part00" /tmp/smol/ && echo "part 1 staged" ;;
    smol-part2) cat /tmp/smol/part00 "$GPU_DIR/smol2/part01" >"$GGUF" && rm /tmp/smol/part00 \
                  && echo "$(cat "$GPU_DIR/smol2/sha256")  $GGUF" | sha256sum -c ;;
    gputests) step gputests python3 -m pytest -q -p no:cacheprovider tests/test_backend_gpu.py \
                tests/test_kernels_triton.py ${PYTEST_ARGS:-} ;;
    select) step select python3 benchmarks/bench_select.py --out "$OUT/select.json" --plot ${SELECT_ARGS:-} ;;
    select-quick) step select python3 benchmarks/bench_select.py --quick --out "$OUT/select.json" --plot ;;
    # flashinfer (its default decode CUDA graphs) and tokenselect; kept in /tmp for e2e-nocg
    e2e) step e2e python3 benchmarks/e2e_bench.py --out-dir "$OUT" --time-budget "${E2E_BUDGET:-540}" \
           && mkdir -p "$PREV" && cp "$OUT/e2e.json" "$PREV/" ;;
    # flashinfer without CUDA graphs (like-for-like with tokenselect), merged with the last e2e
    e2e-nocg) step e2e python3 benchmarks/e2e_bench.py --out-dir "$OUT" --backends flashinfer@nocg \
           --compare-with "$PREV/e2e.json" --time-budget "${E2E_BUDGET:-540}" ;;
    e2e-quick) step e2e python3 benchmarks/e2e_bench.py --out-dir "$OUT" --quick ;;
    accuracy) step accuracy python3 benchmarks/accuracy_gpu.py --gguf "$GGUF" --out-dir "$OUT" --time-budget "${ACC_BUDGET:-540}" ${ACC_ARGS:-} ;;
    # issue 11: SmolLM2 pass key / multi-key at 8K-64K, dense vs tokenselect vs tokenselect
    # --tokenselect-extrapolate (3 servers side by side). The first start JIT-compiles FlashInfer's
    # RoPE (ROPE_LLAMA) decode/prefill variants, not in the AOT cache: allow minutes.
    extrapolation) step extrapolation python3 benchmarks/extrapolation_gpu.py --gguf "$GGUF" --out-dir "$OUT" \
                     --time-budget "${EXTRAP_BUDGET:-540}" ${EXTRAP_ARGS:-} ;;
    # ~30-60 s (xz of the compiled modules); run alone, after servers of every backend ran.
    jit-save) step jit_save jit_save ;;
    # ~10 s; before the first server of a fresh machine, e.g. `jit-restore e2e-bs1-a`.
    jit-restore) step jit_restore jit_restore ;;
    # bs=1 decode at 4K/32K/128K/256K, flashinfer + tokenselect@t1. Estimate (warm): per backend
    # start ~70 s + warmup ~10 s + prefills ~1+4+15+45 s + decode 4x128 tokens ~5 s + stop ~10 s
    # = ~160 s; ~5.5-6 min in all (+4 min on a fresh machine without jit-restore).
    # BS1_A overrides the backends (e.g. BS1_A=flashinfer alone on a fresh machine, where its
    # first start absorbs the JIT, then BS1_B=tokenselect@t1,tokenselect@t0.9,tokenselect@t-1).
    e2e-bs1-a) step e2e_bs1 e2e_bs1 --backends "${BS1_A:-flashinfer,tokenselect@t1}"; keep bs1.json ;;
    # Selection Cache thresholds 0.9 and -1 (static selection), merged with e2e-bs1-a's JSON
    # (same machine, or carried as $GPU_DIR/prev/bs1.json). Estimate (warm): ~5.5-6 min.
    e2e-bs1-b) p=$(prev_json bs1.json)
               step e2e_bs1 e2e_bs1 --backends "${BS1_B:-tokenselect@t0.9,tokenselect@t-1}" ${p:+--compare-with "$p"}
               keep bs1_b.json ;;
    # Decode throughput, 32x24K and 64x8K concurrent streams. Estimate (warm) per backend: start
    # ~70 s + warmup ~10 s + 786K-token prefill ~40-65 s + 524K-token prefill ~25-45 s + decode
    # 2x128 steps ~10 s + stop ~10 s = ~165-210 s. Two backends: ~6-7 min.
    e2e-tput-a) step e2e_tput e2e_tput --backends flashinfer,tokenselect@t1; keep tput.json ;;
    # tokenselect@t-1, merged with e2e-tput-a's JSON (or $GPU_DIR/prev/tput.json): ~3.5 min.
    e2e-tput-b) p=$(prev_json tput.json)
                step e2e_tput e2e_tput --backends tokenselect@t-1 ${p:+--compare-with "$p"}
                keep tput_b.json ;;
    # All three in one command: ~8.5-10.5 min, i.e. may not fit; the budget (540 s) then skips
    # the last configurations (recorded as skipped). Prefer e2e-tput-a + e2e-tput-b.
    e2e-tput) step e2e_tput e2e_tput --backends flashinfer,tokenselect@t1,tokenselect@t-1; keep tput.json ;;
    # Locust soak, see soak() above. Estimate: server start ~70 s warm (tokenselect's first start
    # on a machine ~145 s; with jit-restore first on a fresh one) + SOAK_TIME + stop-timeout 20 s +
    # drain check ~5-60 s + stop ~10 s: ~7-9 min with 5m, within SOAK_BUDGET=540 s.
    soak) step soak soak ;;
    # Issue 10: time to first token, bs=1, at 8K/32K/128K/256K, dense (flashinfer) against sparse
    # prefill (tokenselect@sp; PREFILL_A overrides the backends), after greedy ids below the budget,
    # 8 concurrent requests and a shared-prefix pair (radix cache) with sparse prefill on. Estimate
    # (warm) per backend: start ~70 s + ~30 s of short phases + prefills ~2+4+15+45 s (dense) +
    # decode/stop ~15 s: ~6-7 min for two.
    prefill-bs1) step e2e_bs1 e2e_bs1 --backends "${PREFILL_A:-flashinfer,tokenselect@sp}" \
                   --phases warmup,correctness,batching,shared_prefix,long_context \
                   --contexts 8192,32768,131072,262144; keep prefill_bs1.json ;;
    # Issue 10: prefill throughput of 8 concurrent 32K prompts (the throughput phase's prefill_s
    # and prefill_tokens), dense against sparse prefill: ~4-5 min for two.
    prefill-tput) TPUT=8x32768 step e2e_tput e2e_tput --backends "${PREFILL_A:-flashinfer,tokenselect@sp}"
                  keep prefill_tput.json ;;
    # Issue 11: decode speed with extrapolation against the same budget without it (both with
    # sparse prefill, θ=1 so that every step selects), bs=1 at 32K and 128K: ~5 min.
    extrap-speed) step e2e_bs1 e2e_bs1 --backends tokenselect@t1@sp,tokenselect@t1@x --contexts 32768,131072
                  keep extrap_speed.json ;;
    *) echo "unknown step $s"; status=2 ;;
  esac
done
exit $status
