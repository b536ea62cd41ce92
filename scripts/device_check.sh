#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU: install s3jax with JAX's CUDA 12 build, then, within
# about 8 minutes, run the tests that can run on the device, the decode ceiling (bench_decode.py)
# and the engine benchmark (benchmark.py) on the gpt-j-6b shape in bf16, writing JSON to a results
# folder and a summary to stdout. So whichever issue is lent a GPU records real figures at once.
#
#   scripts/device_check.sh                       # venv .venv-device, results/device/<date-time>
#   VENV=/path/to/venv OUT=/tmp/dc scripts/device_check.sh
#   SKIP_INSTALL=1 scripts/device_check.sh        # the python on PATH already has s3jax and jax[cuda12]
#
# Every stage has its own time limit and the script goes on after a failed one (the summary says
# which failed); it exits 1 when any stage failed. PyTorch is not installed: the tests that compare
# against it (marker torch) and the modules that import it are left out, and bench_decode runs with
# --no-torch.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV="${VENV:-$REPO/.venv-device}"
OUT="${OUT:-$REPO/results/device/$(date +%Y%m%d-%H%M%S)}"
MODEL="${MODEL:-gpt-j-6b}"
# Seconds per stage: install, device probe, tests, decode ceiling, engine benchmark (the last four: 8 min).
T_INSTALL="${T_INSTALL:-420}" T_PROBE="${T_PROBE:-60}" T_TESTS="${T_TESTS:-180}"
T_DECODE="${T_DECODE:-110}" T_ENGINE="${T_ENGINE:-130}"
mkdir -p "$OUT"
declare -A STATUS=()

stage() {  # stage NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output to OUT/NAME.log
  local name="$1" seconds="$2"
  shift 2
  echo "== $name (at most ${seconds}s)"
  local start=$SECONDS
  timeout --kill-after=10 "$seconds" "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  case $rc in
    0) STATUS[$name]="ok" ;;
    124 | 137) STATUS[$name]="timed out after ${seconds}s" ;;
    *) STATUS[$name]="failed (exit $rc)" ;;
  esac
  echo "== $name: ${STATUS[$name]} in $((SECONDS - start))s"
}

if [[ -z "${SKIP_INSTALL:-}" ]]; then
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  # The serve and train extras: the server's tests and the retrainer's; the cuda12 extra: jax[cuda12].
  # The test runner and the HTTP client come by hand, not the test extra, which brings PyTorch.
  stage install "$T_INSTALL" bash -c "'$VENV/bin/python' -m pip install -q -e '.[serve,train,cuda12]' pytest httpx \
    -c constraints.txt"
  PY="$VENV/bin/python"
else
  PY="${PYTHON:-python3}"
  STATUS[install]="skipped (SKIP_INSTALL)"
fi

stage probe "$T_PROBE" "$PY" -c '
import jax, sys
devices = jax.devices()
print("jax", jax.__version__, "backend", jax.default_backend(), "devices", devices)
sys.exit(0 if jax.default_backend() == "gpu" else "no GPU: JAX runs on " + jax.default_backend())
'

# What runs on one GPU: not the PyTorch comparisons (not installed), not the slow, server-process or
# wall-clock tests, not tests/parallel (it forces 8 CPU devices) nor the packaging and notebook tests.
stage tests "$T_TESTS" "$PY" -m pytest tests -x -q -p no:cacheprovider \
  -m "not torch and not slow and not server and not timing" \
  --ignore=tests/parallel --ignore=tests/test_packaging.py --ignore=tests/test_notebook.py \
  --ignore=tests/models/test_hf_equivalence.py --ignore=tests/models/test_llama.py \
  --ignore=tests/models/test_gguf.py --ignore=tests/predictor/test_encoder.py \
  --junitxml="$OUT/tests.xml"

# Decode tokens/s of the engine's own executable, random gpt-j-6b weights in bf16 (12 GB).
stage bench_decode "$T_DECODE" "$PY" scripts/bench_decode.py --model "$MODEL" --dtype bfloat16 --no-torch \
  --no-write --batches 1 8 32 --cache-lens 256 1024 --new-tokens 16 --repeats 2 --peak-n 4096 \
  --json "$OUT/bench_decode.json"

# The engine: max and s3 on a short trace at a budget of 4 max-length sequences, no peers, no sweep.
stage benchmark "$T_ENGINE" "$PY" scripts/benchmark.py --model "$MODEL" --dtype bfloat16 --num-requests 16 \
  --max-output 128 --budget-slots 4 --policies max,s3 --constant-quantiles "" --peers "" --decode-steps 8 \
  --no-progress --out "$OUT/benchmark" --tag "$MODEL-bf16"

echo
echo "== summary ($OUT)"
failed=0
for name in install probe tests bench_decode benchmark; do
  echo "$name: ${STATUS[$name]:-not run}"
  [[ "${STATUS[$name]:-}" == ok || "${STATUS[$name]:-}" == skipped* ]] || failed=1
done
"$PY" - "$OUT" "$MODEL" <<'EOF' || true
import json, pathlib, sys
out, model = pathlib.Path(sys.argv[1]), sys.argv[2]
summary = {}
decode = out / "bench_decode.json"
if decode.is_file():
  d = json.loads(decode.read_text())
  summary["decode_tokens_per_s"] = {f"B={c['batch']} S={c['cache_len']}": c["s3jax_tokens_per_s"] for c in d["cells"]}
  summary["device"] = d["device"]
engine = out / "benchmark" / f"{model}-bf16.json"
if engine.is_file():
  e = json.loads(engine.read_text())
  summary["device"] = e["settings"]["device"]
  for budget in e["budgets"]:
    summary[f"engine_tokens_per_s_budget{budget['budget_slots']}"] = {
      name: run["tokens_per_s"] for name, run in budget["policies"].items()
    }
    if "decode_ceiling" in budget:
      summary[f"decode_ceiling_budget{budget['budget_slots']}"] = budget["decode_ceiling"]["tokens_per_s"]
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
exit $failed
