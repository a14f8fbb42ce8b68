#!/usr/bin/env bash
# Runs ON the offline GPU host, from the repository root, after ../shared/gpu's four install
# chunks put SGLang 0.5.17 into /tmp/site (see benchmarks/README.md). Writes under $OUT.
#   bash benchmarks/gpu_session.sh STEP [STEP ...]   (GPU_DIR: the carried .gpu folder, default .gpu)
# Steps: env, smol-part1, smol-part2, gputests, select, select-quick, e2e, e2e-quick, accuracy
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . >"$OUT/pip.log" 2>&1 \
  || { cat "$OUT/pip.log"; exit 1; }
GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
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

for s in "$@"; do
  case $s in
    env) step env bash -c 'nvidia-smi; python3 -c "import torch, triton, sglang, flashinfer; print(torch.__version__, triton.__version__, sglang.__version__, flashinfer.__version__, torch.cuda.get_device_name())"' ;;
    smol-part1) mkdir -p /tmp/smol && cp "${GPU_DIR:-.gpu}/smol1/part00" /tmp/smol/ && echo "part 1 staged" ;;
    smol-part2) cat /tmp/smol/part00 "${GPU_DIR:-.gpu}/smol2/part01" >"$GGUF" && rm /tmp/smol/part00 \
                  && echo "$(cat "${GPU_DIR:-.gpu}/smol2/sha256")  $GGUF" | sha256sum -c ;;
    gputests) step gputests python3 -m pytest -q -p no:cacheprovider tests/test_backend_gpu.py ${PYTEST_ARGS:-} ;;
    select) step select python3 benchmarks/bench_select.py --out "$OUT/select.json" --plot ;;
    select-quick) step select python3 benchmarks/bench_select.py --quick --out "$OUT/select.json" --plot ;;
    # flashinfer (its default decode CUDA graphs) and tokenselect; kept in /tmp for e2e-nocg
    e2e) step e2e python3 benchmarks/e2e_bench.py --out-dir "$OUT" --time-budget "${E2E_BUDGET:-540}" \
           && mkdir -p /tmp/e2e_prev && cp "$OUT/e2e.json" /tmp/e2e_prev/ ;;
    # flashinfer without CUDA graphs (like-for-like with tokenselect), merged with the last e2e
    e2e-nocg) step e2e python3 benchmarks/e2e_bench.py --out-dir "$OUT" --backends flashinfer@nocg \
           --compare-with /tmp/e2e_prev/e2e.json --time-budget "${E2E_BUDGET:-540}" ;;
    e2e-quick) step e2e python3 benchmarks/e2e_bench.py --out-dir "$OUT" --quick ;;
    accuracy) step accuracy python3 benchmarks/accuracy_gpu.py --gguf "$GGUF" --out-dir "$OUT" --time-budget "${ACC_BUDGET:-540}" ;;
    *) echo "unknown step $s"; status=2 ;;
  esac
done
exit $status
