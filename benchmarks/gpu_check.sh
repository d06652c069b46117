#!/usr/bin/env bash
# One prepared GPU check of lrtrain (issue 19 item 5), one command on a machine with an NVIDIA GPU:
#
#   env     what the machine is (nvidia-smi, nvcc, compute-sanitizer, python, torch)
#   torch   a torch with CUDA: the one there, else pip install torch==2.13.0 into a venv (needs a registry)
#   wheels  extra wheels (e.g. galore-torch) from $GPU_CHECK_WHEELS, --no-index, into a private --target dir
#   build   pip install --no-build-isolation --no-deps -e . (builds lrtrain.update._cuda), timed
#   import  lrtrain.update.available()["cuda"] must be True; the kernels in _cuda*.so
#   tests   the CUDA parity tests + the self-check tests, no sanitizer (LRTRAIN_REQUIRE_EXT=cpu,cuda)
#   bench   benchmarks/gpu_step.py: 48 x 4096x4096 at rank 128, fp32 and bf16, dense AdamW / GaLoreAdamW / DLRT
#   memcheck, racecheck, synccheck   compute-sanitizer on small CUDA parity tests
#
# Every stage runs under `timeout` (its limit, capped by what is left of GPU_CHECK_BUDGET); a failing stage is
# recorded and the next one still runs (stages that need a missing prerequisite are skipped with the reason).
# The benchmark runs before the sanitizers so slow sanitizer runs cannot cost its numbers.
#
# Usage, from anywhere (the script works in its repository's root):
#   OUT=/some/dir bash benchmarks/gpu_check.sh     # results in $OUT (default: benchmarks/results)
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # print the stages and their commands; run nothing
# Writes (4 files, all under $OUT): gpu_check.md (date, device, each stage's status, time and limit),
# gpu_check.log (every stage's output), gpu_step.md and gpu_step.json (the benchmark). gpu_check.md is rewritten
# after every stage, so a run cut short still says how far it got.
#
# Environment (all optional):
#   GPU_CHECK_BUDGET=470       seconds for all stages together (the whole run stays under 8 minutes)
#   GPU_CHECK_PYTHON=python3   the python whose torch is used
#   GPU_CHECK_WHEELS=.whl      folder of wheels to install first (skipped when absent)
#   GPU_CHECK_BENCH_ARGS=""    extra arguments for benchmarks/gpu_step.py
#   GPU_CHECK_SANITIZER_KERNELS="kns=..."  racecheck/synccheck kernel filter (default: lrtrain's own kernels,
#                              found in csrc/cuda/*.cu; "all": no filter). memcheck always checks every kernel.
# Exit status: 0 every stage passed; 1 a stage failed, timed out or was cut by the budget; 2 no usable GPU here
# (nvidia-smi or torch.cuda unavailable: the GPU stages are skipped, gpu_check.md still written). CI has no GPU
# and does not run this.
# shellcheck disable=SC2317  # the st_* stage functions run through `bash -c st_NAME` (export -f)
set -u
set -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET:-470}
PY=${GPU_CHECK_PYTHON:-$(command -v python3 || command -v python || echo python3)}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG="$OUT_DIR/gpu_check.log"
MD="$OUT_DIR/gpu_check.md"
START=$(date +%s)
STARTED_AT=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
SAN=$(command -v compute-sanitizer || true)
for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [[ -z $SAN && -x $c ]] && SAN=$c
done
export ROOT PY OUT_DIR WORK WHEELS SAN PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

if [[ $DRY == 1 ]]; then
  DEVICE="(dry run: nvidia-smi not queried)"
elif command -v nvidia-smi >/dev/null 2>&1; then
  DEVICE=$(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | paste -sd';' -)
  DEVICE=${DEVICE:-nvidia-smi printed nothing}
else
  DEVICE="no GPU: nvidia-smi not found"
fi
HAVE_GPU=0
[[ $DRY != 1 ]] && timeout 30 nvidia-smi -L >/dev/null 2>&1 && HAVE_GPU=1
export HAVE_GPU

# racecheck/synccheck: only lrtrain's kernels (the sanitizers' slowness and other libraries' kernels stay out)
KFILTER=()
if [[ ${GPU_CHECK_SANITIZER_KERNELS:-} == all ]]; then
  :
elif [[ -n ${GPU_CHECK_SANITIZER_KERNELS:-} ]]; then
  KFILTER=(--kernel-name "$GPU_CHECK_SANITIZER_KERNELS")
else
  while read -r k; do KFILTER+=(--kernel-name "kns=$k"); done < <(
    grep -h -A2 '__global__' csrc/cuda/*.cu 2>/dev/null | grep -oE '\b[A-Za-z_][A-Za-z0-9_]*_kernel\b' | sort -u)
fi
KFILTER_TEXT=${KFILTER[*]:-none (every kernel)}

# ------------------------------------------------------------------------------------------------ stages
# Each runs as `timeout LIMIT bash -c st_NAME`, in the repository root, its output in gpu_check.log. A line
# "DETAIL: ..." goes into gpu_check.md's table.
st_env() {
  echo "date: $(date -u)"; uname -a; echo "cores: $(nproc)"; free -g 2>/dev/null | head -n 2
  echo "python: $PY ($("$PY" --version 2>&1))"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  echo "compute-sanitizer: ${SAN:-not found}"; [[ -n $SAN ]] && "$SAN" --version | tail -n 1
  if ! command -v nvidia-smi >/dev/null; then echo "DETAIL: no GPU: nvidia-smi not found"; exit 1; fi
  nvidia-smi || { echo "DETAIL: no GPU: nvidia-smi failed"; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
  echo "DETAIL: $(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader | head -n 1)"
}

st_torch() {
  local has='import sys, torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available()); sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)'
  local out rc
  out=$("$PY" -c "$has" 2>&1); rc=$?
  echo "$out"
  if (( rc == 0 )); then echo "$PY" > "$WORK/python"; echo "DETAIL: $(tail -n 1 <<<"$out")"; exit 0; fi
  if [[ $HAVE_GPU != 1 ]]; then
    echo "DETAIL: no GPU: $(tail -n 1 <<<"$out") (no CUDA torch installed without a GPU)"; exit 1
  fi
  echo "torch here lacks CUDA or does not see the GPU: a venv with torch==2.13.0 (the default index serves CUDA)"
  "$PY" -m venv "$WORK/venv" || { echo "DETAIL: python -m venv failed"; exit 1; }
  "$WORK/venv/bin/python" -m pip install --retries 1 --timeout 30 torch==2.13.0 numpy einops pytest hypothesis \
    setuptools wheel ninja || { echo "DETAIL: torch lacks CUDA; pip install torch==2.13.0 failed (no registry?)"; exit 1; }
  "$WORK/venv/bin/python" -c "$has" || { echo "DETAIL: the installed torch==2.13.0 does not see the GPU"; exit 1; }
  echo "$WORK/venv/bin/python" > "$WORK/python"
  echo "DETAIL: installed $("$WORK/venv/bin/python" -c "$has" 2>&1 | tail -n 1) in a venv"
}

st_wheels() {
  ls "$WHEELS"/*.whl
  PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" \
    "$WHEELS"/*.whl || exit 1
  echo "DETAIL: $(for f in "$WHEELS"/*.whl; do basename "$f"; done | paste -sd' ' -) into $WORK/site"
}

st_build() {
  local cap t0
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} MAX_JOBS=${MAX_JOBS:-$(nproc)}
  [[ -z ${CUDA_HOME:-} ]] && command -v nvcc >/dev/null && CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
  export CUDA_HOME=${CUDA_HOME:-}
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=$CUDA_HOME"
  t0=$(date +%s)
  PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
    || { echo "DETAIL: pip install -e . FAILED after $(( $(date +%s) - t0 )) s (log: gpu_check.log)"; exit 1; }
  echo "DETAIL: built in $(( $(date +%s) - t0 )) s (sm ${TORCH_CUDA_ARCH_LIST}, ${MAX_JOBS} jobs)"
}

st_import() {
  "$PY" - <<'EOF'
import sys
import lrtrain.update as u
print("available:", u.available())
print("load errors:", u.load_errors())
ok = u.available()["cuda"]
print("DETAIL: cuda backend " + ("active" if ok else f"NOT active: {u.load_errors().get('cuda', 'not built')}"))
sys.exit(0 if ok else 1)
EOF
  local rc=$? so
  for so in lrtrain/update/_cuda*.so; do
    if [[ ! -f $so ]] || ! command -v cuobjdump >/dev/null; then continue; fi
    echo "kernels in $so:"; cuobjdump -symbols "$so" 2>/dev/null | grep -i 'STT_FUNC' | grep -i lrtrain | sort -u
  done
  exit "$rc"
}

st_tests() {
  LRTRAIN_REQUIRE_EXT=cpu,cuda "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_ext_parity.py \
    tests/test_self_check.py -k "cuda or required_backends or self_check"
}

st_bench() {
  # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of arguments
  "$PY" benchmarks/gpu_step.py --device cuda --out "$OUT_DIR" --budget-s "$(( STAGE_LIMIT - 45 ))" \
    ${GPU_CHECK_BENCH_ARGS:-}
}

# memcheck: every kernel (torch's too: lrtrain's C++ hands them its views), each allocation exact (no caching);
# the CUDA layer-parity tests up to 300x200 and the forced-rank test
st_memcheck() {
  # shellcheck disable=SC2086  # SAN_OPTS is a list of arguments
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck $SAN_OPTS \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_ext_parity.py \
    -k "(test_cuda_layer_parity and not 1024 and not 512-512) or test_cuda_rank_deficient"
}

# racecheck / synccheck: lrtrain's kernels (shared memory, __syncthreads), two tests: f32 and f64, two shapes
SAN_TESTS="test_cuda_layer_parity and (64-96-16-f32 or 300-200-32-f64)"
st_racecheck() {
  # shellcheck disable=SC2086  # SAN_OPTS and KFILTER_ARGS are lists of arguments
  "$SAN" --tool racecheck $SAN_OPTS $KFILTER_ARGS \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_ext_parity.py -k "$SAN_TESTS"
}

st_synccheck() {
  # shellcheck disable=SC2086
  "$SAN" --tool synccheck $SAN_OPTS $KFILTER_ARGS \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_ext_parity.py -k "$SAN_TESTS"
}

KFILTER_ARGS=${KFILTER[*]:-}
# 86 = errors found. API errors are not reported: PyTorch itself makes CUDA calls that fail by design (probes), which
# would count as errors; what is checked is the kernels' memory accesses, shared-memory races and barriers.
SAN_OPTS="--error-exitcode 86 --print-limit 30 --report-api-errors no"
export SAN_TESTS KFILTER_ARGS SAN_OPTS
export -f st_env st_torch st_wheels st_build st_import st_tests st_bench st_memcheck st_racecheck st_synccheck

# ------------------------------------------------------------------------------------------------ runner
ORDER=(env torch wheels build import tests bench memcheck racecheck synccheck)
declare -A LIMIT=([env]=30 [torch]=240 [wheels]=30 [build]=240 [import]=30 [tests]=100 [bench]=200
                  [memcheck]=120 [racecheck]=75 [synccheck]=60)
declare -A STATUS=() SECS=() USED_LIMIT=() DETAIL=()
FAILED=0

md_escape() { printf '%s' "$1" | tr '|\n' '/ ' | cut -c1-300; }

write_md() {  # gpu_check.md from what has run so far
  local s now
  now=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
  {
    echo "# lrtrain GPU check"
    echo
    echo "- date: started $STARTED_AT, this summary written $now"
    echo "- device (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv): $DEVICE"
    echo "- python: $PY; commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- command: \`bash benchmarks/gpu_check.sh\` (OUT=$OUT_DIR${GPU_CHECK_DRY:+, GPU_CHECK_DRY=$DRY}), budget ${BUDGET} s, elapsed $(( $(date +%s) - START )) s"
    echo "- compute-sanitizer: ${SAN:-not found} ($SAN_OPTS); kernels checked by racecheck and synccheck: $KFILTER_TEXT; by memcheck: every kernel"
    echo
    echo "| stage | status | time (s) | limit (s) | detail |"
    echo "|---|---|---:|---:|---|"
    for s in "${ORDER[@]}"; do
      echo "| $s | ${STATUS[$s]:-not run yet} | ${SECS[$s]:--} | ${USED_LIMIT[$s]:-${LIMIT[$s]}} | $(md_escape "${DETAIL[$s]:-}") |"
    done
    echo
    echo "Benchmark: [gpu_step.md](gpu_step.md) (and gpu_step.json); every stage's output: gpu_check.log."
    if [[ -f $OUT_DIR/gpu_step.md && ${STATUS[bench]:-} != "" ]]; then  # its tables, as gpu_step.md has them
      echo; awk '/^## (fp32|bf16)/ {on = 1} /^## Method/ {on = 0} on' "$OUT_DIR/gpu_step.md"
    fi
    for s in "${ORDER[@]}"; do
      case ${STATUS[$s]:-} in
        FAIL*|TIMEOUT*|KILLED*|ERRORS*)
          echo; echo "<details><summary>$s: last lines of its output</summary>"; echo; echo '```'
          tail -n 25 "$WORK/$s.log" 2>/dev/null; echo '```'; echo; echo "</details>" ;;
      esac
    done
  } > "$MD.tmp" && mv "$MD.tmp" "$MD"
}

skip() { STATUS[$1]="skipped ($2)"; SECS[$1]=0; write_md; printf '%-10s %s\n' "$1" "${STATUS[$1]}"; }

run_stage() {  # run_stage NAME: runs st_NAME under timeout, records status, time, detail
  local name=$1 limit=${LIMIT[$1]} left t0 rc slog="$WORK/$1.log" st
  left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 20 )); then skip "$name" "budget spent"; FAILED=1; return 1; fi
  (( limit > left - 5 )) && limit=$(( left - 5 ))
  USED_LIMIT[$name]=$limit
  if [[ $DRY == 1 ]]; then
    STATUS[$name]="planned (dry run)"; SECS[$name]=0
    printf '=== %s (limit %ss): timeout -k 10 %s bash -c st_%s\n' "$name" "$limit" "$limit" "$name"
    declare -f "st_$name" | sed '1,2d;$d'
    write_md; return 0
  fi
  printf '%-10s running (limit %ss) ...\n' "$name" "$limit"
  echo "===== $name: limit ${limit}s, started $(date -u '+%H:%M:%S UTC') =====" >> "$LOG"
  t0=$(date +%s)
  STAGE_LIMIT=$limit timeout -k 10 "$limit" bash -c "st_$name" < /dev/null 2>&1 | tee -a "$LOG" > "$slog"
  rc=${PIPESTATUS[0]}
  SECS[$name]=$(( $(date +%s) - t0 ))
  case $rc in
    0) st="ok" ;;
    124) st="TIMEOUT after ${limit}s" ;;
    137) st="KILLED after ${limit}s (did not stop on SIGTERM)" ;;
    86) st="ERRORS found (compute-sanitizer)" ;;
    5) st="FAIL (pytest collected no test)" ;;
    *) st="FAIL (exit $rc)" ;;
  esac
  STATUS[$name]=$st
  DETAIL[$name]=$( { grep -h -e '^DETAIL: ' -e '^gpu_step: done ' "$slog" | sed 's/^DETAIL: //'
                     grep -hE '(^|= )[0-9]+ (passed|failed|errors?|skipped)' "$slog" | tail -n 1
                     grep -h 'ERROR SUMMARY' "$slog" | tail -n 1; } | paste -sd';' - )
  echo "===== $name: $st in ${SECS[$name]}s =====" >> "$LOG"
  [[ $rc != 0 ]] && FAILED=1
  printf '%-10s %s in %ss%s\n' "$name" "$st" "${SECS[$name]}" "${DETAIL[$name]:+: ${DETAIL[$name]}}"
  write_md
  return "$rc"
}

: > "$LOG"
[[ $DRY == 1 ]] && rm -f "$LOG"
echo "gpu_check: $DEVICE; results in $OUT_DIR; budget ${BUDGET}s"
write_md

run_stage env
if run_stage torch; then
  [[ -s $WORK/python ]] && PY=$(cat "$WORK/python") && export PY
  TORCH_OK=1
else
  TORCH_OK=0
fi
[[ $DRY == 1 ]] && TORCH_OK=1 HAVE_GPU=1

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  run_stage wheels && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
else
  skip wheels "no $WHEELS/*.whl"
fi

EXT_OK=0
if (( HAVE_GPU && TORCH_OK )); then
  run_stage build && run_stage import && EXT_OK=1
  [[ -z ${STATUS[import]:-} ]] && skip import "build failed"
else
  skip build "no GPU or no CUDA torch"; skip import "no GPU or no CUDA torch"
fi
[[ $DRY == 1 ]] && EXT_OK=1

if (( EXT_OK )); then run_stage tests; else skip tests "CUDA backend not active"; fi
# the benchmark also runs without the CUDA backend (then DLRT uses the reference update, and the table says so)
if (( HAVE_GPU && TORCH_OK )); then run_stage bench; else skip bench "no GPU or no CUDA torch"; fi
for s in memcheck racecheck synccheck; do
  if (( ! EXT_OK )); then skip "$s" "CUDA backend not active"
  elif [[ -z $SAN && $DRY != 1 ]]; then skip "$s" "compute-sanitizer not found"; FAILED=1
  else run_stage "$s"
  fi
done

write_md
echo
cat "$MD"
rm -rf "$WORK"
if [[ $DRY == 1 ]]; then exit 0; fi
if (( ! HAVE_GPU || ! TORCH_OK )); then exit 2; fi
exit "$FAILED"
