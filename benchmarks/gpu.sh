#!/usr/bin/env bash
# The issue-16 benchmarks on an accelerator, in one prepared run (well under 8 minutes).
#
#   bash benchmarks/gpu.sh              # on the GPU machine, from the repo root; tables -> $OUT/
#   GPU_DRY=1 bash benchmarks/gpu.sh    # rehearsal here: CPU, this checkout's .venv, tiny sizes
#
# Runs, each under its own `timeout` (all together inside GPU_BUDGET_S, default 450 s) and each
# allowed to fail without stopping the others:
# benchmarks/memory.py, step_time.py --resnet, cost_stages.py, conal_step.py, grads_tree.py.
# Every table goes to $OUT/<name>.md (default $OUT: /tmp/mtl_gpu_out), the machine to $OUT/env.txt,
# everything printed to $OUT/gpu.log: 7 files.
#
# Python. A machine whose python3 already has JAX with a GPU backend, flax and optax (the lent
# H200 image: jax 0.11 with CUDA 13, no network) is used as it is, with the repo on PYTHONPATH.
# Packages the experiment suite's import check wants but the benchmarks never use are supplied:
# ml_collections from a carried wheel (.whl/ml_collections-*.whl, if carried), else -- like grain
# and tensorflow_datasets -- as an empty stub module in /tmp/gpu_shim (only
# experiments/__init__.py's find_spec check sees them; experiments.models.resnet needs none).
# Otherwise (a bare machine WITH network): python3 -m venv, pip install -r requirements-dev.txt
# -e . and jax[cuda12] at the version the requirements resolved (JAX_VERSION overrides it).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mtl_gpu_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false # measured peaks, and memory.py's subprocess check
export TF_CPP_MIN_LOG_LEVEL=2
say() { echo "$@" | tee -a "$LOG"; }
START=$(date +%s)

if [ "${GPU_DRY:-0}" = "1" ]; then
  say "## GPU_DRY=1: CPU rehearsal with tiny sizes"
  export JAX_PLATFORMS=cpu
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
elif python3 -c 'import jax, flax, optax; assert jax.default_backend() == "gpu"' 2>>"$LOG"; then
  say "## using the preinstalled python3 (JAX on the GPU)"
  PY=python3
else
  say "## no GPU JAX in python3: creating a venv and installing (needs network)"
  python3 -m venv /tmp/mtl_venv && PY=/tmp/mtl_venv/bin/python
  $PY -m pip install -q --upgrade pip >>"$LOG" 2>&1
  $PY -m pip install -q -r requirements-dev.txt -e . >>"$LOG" 2>&1 || say "pip install failed"
  JAX_VERSION="${JAX_VERSION:-$($PY -c 'import jax; print(jax.__version__)')}"
  $PY -m pip install -q "jax[cuda12]==$JAX_VERSION" >>"$LOG" 2>&1 || say "jax[cuda12] failed"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The experiment suite's import check (experiments/__init__.py) wants these; see the header.
SHIM=/tmp/gpu_shim
for mod in ml_collections grain tensorflow_datasets absl orbax; do
  if ! $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('$mod') is None)" 2>/dev/null; then
    whl=$(ls .whl/"$mod"-*.whl 2>/dev/null | head -1)
    if [ -n "$whl" ]; then
      $PY -m pip install -q --no-index --no-deps --target "$SHIM" "$whl" >>"$LOG" 2>&1
      say "installed $whl into $SHIM"
    else
      mkdir -p "$SHIM/$mod" && echo "# stub for experiments/__init__.py's import check" >"$SHIM/$mod/__init__.py"
      say "stub module $mod in $SHIM"
    fi
  fi
done
export PYTHONPATH="$PYTHONPATH:$SHIM"

{
  echo "# $(date -u) $(uname -m) $(nproc) CPUs, load: $(cut -d' ' -f1-3 /proc/loadavg)"
  nvidia-smi 2>&1 || echo "(no nvidia-smi)"
  $PY -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__); print(jax.devices()); d = jax.devices()[0]; print(d.device_kind, getattr(d, "memory_stats", lambda: None)())' 2>&1
} | tee "$OUT/env.txt" >>"$LOG"

# name, timeout (s), command; sizes for an H200 unless GPU_DRY=1.
if [ "${GPU_DRY:-0}" = "1" ]; then
  MEM="--ks 2 8 --hiddens 64 128 --batch 16 --chunk-batch 256 --verify-gib 0.05 --resnet-ks 2 4 --resnet-width 4 --resnet-batch 2"
  RES="--resnet --resnet-ks 2 4 --resnet-width 8 --resnet-batch 4 --repeats 2 --inner 1"
  COST="--ks 2 4 --width 8 --batch 4 --rounds 2 --inner 1"
  CONAL="--ks 2 --rounds 2 --inner 1"
  TREE="--ks 2 --hidden 32 --repeats 2"
  T=(240 240 240 240 240)
  GPU_BUDGET_S="${GPU_BUDGET_S:-1200}"
else
  MEM="--ks 2 16 128 --hiddens 1024 4096 --batch 64 --chunk-batch 4096 --verify-gib 16 --resnet-ks 2 40"
  RES="--resnet --resnet-ks 2 40 --resnet-width 64 --resnet-batch 32 --repeats 7 --inner 2"
  COST="--ks 2 5 10 20 40 --width 64 --batch 32 --rounds 5 --inner 2"
  CONAL="--ks 2 10 --rounds 5 --inner 3"
  TREE="--ks 2 10 40 --repeats 10"
  T=(30 30 130 120 140) # grads_tree conal_step memory step_time cost_stages
fi
# The whole run stays inside GPU_BUDGET_S (default 450 s): each benchmark gets at most what is left.
BUDGET="${GPU_BUDGET_S:-450}"

run() { # name timeout args...
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then
    say "## $name: skipped (GPU_BUDGET_S=$BUDGET spent)"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  say "## $name: $* (timeout ${limit}s)"
  local t0=$(date +%s)
  timeout "$limit" $PY "$@" 2>>"$LOG" | tee "$OUT/$name.md" >>"$LOG"
  local rc=${PIPESTATUS[0]}
  say "## $name: rc $rc after $(($(date +%s) - t0)) s"
}

run grads_tree "${T[0]}" benchmarks/grads_tree.py $TREE
run conal_step "${T[1]}" benchmarks/conal_step.py $CONAL
run memory "${T[2]}" benchmarks/memory.py $MEM
run step_time "${T[3]}" benchmarks/step_time.py $RES
run cost_stages "${T[4]}" benchmarks/cost_stages.py $COST
say "## done in $(($(date +%s) - START)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
