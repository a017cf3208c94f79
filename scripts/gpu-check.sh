#!/usr/bin/env bash
# Cherry's GPU check, for a GPU machine without network (README "GPUs", docs/gpu.md).
#
#   scripts/gpu-check.sh [--dry-run] [--wheelhouse DIR] [--target DIR] [--python PYTHON] [--out DIR]
#
# Needs a Python with a CUDA torch. Installs Cherry and its dependencies from the wheelhouse
# (`make wheelhouse` on a machine with network) into a target directory (no index, no venv; the
# system's torch is used), then prints one line per check: PASS or FAIL, its seconds, and its log.
# --dry-run: checks the wheelhouse and prints the plan, on any machine; it exits 0 and says what is
# missing, so it can run where no wheelhouse has been built (the test suite runs it).
set -u -o pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DRY_RUN=0
WHEELHOUSE="$ROOT/wheelhouse"
TARGET=""
PYTHON="${PYTHON:-python3}"
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --wheelhouse) WHEELHOUSE="$2"; shift ;;
    --target) TARGET="$2"; shift ;;
    --python) PYTHON="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)"; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-$(mktemp -d -t cherry-gpu-check.XXXXXX)}"
TARGET="${TARGET:-$OUT/site}"
mkdir -p "$OUT"

CHECKS=(
  "install: Cherry, its benchmarks and their wheels into $TARGET (pip --no-index --no-deps --target)"
  "cuda-torch: torch sees a CUDA GPU; its name, capability and the dtype 'auto' picks"
  "cuda-tests: pytest -m gpu (CUDA unit tests; 2-GPU tests where there are 2 GPUs: per-rank prepare work, FSDP mixed precision)"
  "bench-gpu: cherry bench gpu (tokens/s, MFU, peak memory, the bf16-vs-fp32 update check)"
  "dpo-bf16: a short DPO run of the demo model on cuda in bf16"
  "grpo-bf16: a short GRPO run (beta 0.04: reference log-probs in prepare) on cuda in bf16"
  "dpo-fp16: a short DPO run in fp16 with loss scaling"
  "resume: a cuda run cut at its checkpoint and resumed gives the uninterrupted run's losses"
  "checkpoint-on-cpu: a checkpoint written on the GPU resumes on the CPU"
  "two-gpus: 2-process ddp and fsdp runs equal one process; held state and peak memory per rank (skipped on 1 GPU)"
  "peak-memory: each run's peak from the CUDA allocator (in the lines above)"
)

check_wheelhouse() {
  local ok=1
  if [ ! -d "$WHEELHOUSE" ] || ! ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1; then
    echo "wheelhouse: MISSING: no wheels in $WHEELHOUSE; build it with \`make wheelhouse\` on a machine with network"
    return 1
  fi
  local size
  size=$(du -sm "$WHEELHOUSE" | cut -f1)
  echo "wheelhouse: $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels, ${size} MiB in $WHEELHOUSE"
  ls "$WHEELHOUSE"/cherry_rlhf-*.whl >/dev/null 2>&1 || { echo "wheelhouse: MISSING: Cherry's own wheel"; ok=0; }
  ls "$WHEELHOUSE"/cherry_benchmarks-*.whl >/dev/null 2>&1 \
    || { echo "wheelhouse: MISSING: the benchmarks' wheel (cherry bench gpu)"; ok=0; }
  if [ -f "$WHEELHOUSE/requirements.txt" ]; then
    # each pin against the wheels' file names (distribution-version-...; names compared as pip does)
    "$PYTHON" - "$WHEELHOUSE" <<'PY' || ok=0
import re, sys
from pathlib import Path
canon = lambda name: re.sub(r"[-_.]+", "-", name).lower()
house = Path(sys.argv[1])
have = {(canon(w.name.split("-")[0]), w.name.split("-")[1]) for w in house.glob("*.whl")}
missing = [pin for pin in house.joinpath("requirements.txt").read_text().split() if (canon(pin.split("==")[0]), pin.split("==")[1]) not in have]
for pin in missing:
    print(f"wheelhouse: MISSING: {pin}")
sys.exit(1 if missing else 0)
PY
  fi
  if [ -s "$WHEELHOUSE/skipped.txt" ]; then
    # left out of the wheelhouse (WHEELHOUSE_SKIP): the target's own copies must be there
    "$PYTHON" - "$WHEELHOUSE/skipped.txt" <<'PY' || ok=0
import sys
from importlib.metadata import PackageNotFoundError, version
lacking = []
for pin in open(sys.argv[1]).read().split():
    name = pin.split("==")[0]
    try:
        print(f"wheelhouse: {name} {version(name)} from the target (the wheelhouse leaves it out)")
    except PackageNotFoundError:
        lacking.append(name)
        print(f"wheelhouse: MISSING: {name}, left out of the wheelhouse and not installed here; rebuild with `make wheelhouse WHEELHOUSE_SKIP=`")
sys.exit(1 if lacking else 0)
PY
  fi
  if ls "$WHEELHOUSE"/torch-*.whl >/dev/null 2>&1; then
    echo "wheelhouse: note: it holds a torch wheel; the target's own CUDA torch is meant to be used"
  fi
  [ "$ok" = 1 ]
}

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu-check --dry-run: the plan (nothing runs)"
  for c in "${CHECKS[@]}"; do echo "  $c"; done
  if check_wheelhouse; then
    echo "gpu-check --dry-run: wheelhouse READY"
  else
    echo "gpu-check --dry-run: wheelhouse NOT READY (the GPU machine needs it; see above)"
  fi
  exit 0
fi

FAILED=0
# step NAME COMMAND...: runs it with its output in $OUT/NAME.log; one line: PASS/FAIL, seconds, last result line
step() {
  local name="$1"; shift
  local started ended rc detail
  started=$(date +%s%N)
  "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  ended=$(date +%s%N)
  local seconds
  seconds="$(( (ended - started) / 1000000000 )).$(( (ended - started) / 100000000 % 10 ))"
  detail="$(grep -E '^\{' "$OUT/$name.log" | tail -1 | cut -c1-300)"
  if [ $rc = 0 ]; then
    printf 'PASS %-18s %6ss %s\n' "$name" "$seconds" "$detail"
  else
    printf 'FAIL %-18s %6ss see %s\n' "$name" "$seconds" "$OUT/$name.log"
    FAILED=1
  fi
  return $rc
}

check_wheelhouse || { echo "FAIL wheelhouse: build it with \`make wheelhouse\` and copy it next to the repo"; exit 1; }
step install "$PYTHON" -m pip install --no-index --no-deps --no-compile -q --target "$TARGET" "$WHEELHOUSE"/*.whl \
  || exit 1
export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
export CHERRY_PRESETS="$ROOT/presets" CHERRY_HOME="$OUT/home" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
CHERRY=("$PYTHON" -c "import sys; from tuiapp.cli import main; sys.argv[0] = 'cherry'; main()")

step cuda-torch "$PYTHON" -c "
import json, torch
from engine.models import pick_dtype
assert torch.cuda.is_available(), 'no CUDA GPU visible'
d = torch.device('cuda')
print(json.dumps({'gpus': torch.cuda.device_count(), 'name': torch.cuda.get_device_name(d), 'capability': torch.cuda.get_device_capability(d), 'auto_dtype': str(pick_dtype('auto', d)), 'torch': torch.__version__}))
" || exit 1

cd "$ROOT"
step cuda-tests "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/unit tests/e2e tests/gpu
step bench-gpu "${CHERRY[@]}" bench gpu --json
for check in dpo-bf16 grpo-bf16 dpo-fp16 resume checkpoint-on-cpu two-gpus; do
  step "$check" "$PYTHON" scripts/gpu_checks.py "$check" "$OUT/runs/$check"
done
echo "logs and runs: $OUT"
exit $FAILED
