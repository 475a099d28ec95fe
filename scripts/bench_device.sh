#!/usr/bin/env bash
# The device checks of issues 4 and 10, as one prepared script: first the device tests on DEVICE
# (tests/test_device.py and the vector and training suites, with DAVSP_TEST_DEVICE=DEVICE;
# log in OUT/tests.log; a failure is reported and the benches still run; skipped when DEVICE=cpu, where
# the CPU suite's fake device covers them), then a short training run
# (scripts/train_smoke.py: SMOKE_STEPS steps of `train_vsp`) in bf16 and with the paper recipe
# (davsp/configs/paper.yaml: fp16 language model, fp32 vision tower, the published output loss); then
# training and generation benches of the project's path against the reference, generation of a
# larger batch (LARGE_N queries in one batch, project path only), generation with the static KV
# cache, then decoding with and without cuDNN attention (scripts/decode_attention_ab.py, two JSON
# lines); one JSON file each, written as each ends, so a run stopped by its time limit still returns
# the steps it finished. Eight files by default (the device tool returns at most 8); SMOKE_ALSO adds one
# per architecture.
#
#   OUT=results bash scripts/bench_device.sh                 # LLaVA-1.5-13B architecture, cuda, bf16
#   MODEL=tiny-llava DEVICE=cpu DTYPE=float32 STEPS=2 N=4 NEW_TOKENS=4 SMOKE_STEPS=2 OUT=/tmp/b bash scripts/bench_device.sh
#
# It runs from the repository root without installing (PYTHONPATH), so it also works on a machine
# with torch and transformers but no network for pip.
set -euo pipefail
MODEL=${MODEL:-llava-1.5-13b}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
STEPS=${STEPS:-20}
N=${N:-16}
NEW_TOKENS=${NEW_TOKENS:-256}
LARGE_N=${LARGE_N:-64}
SMOKE_STEPS=${SMOKE_STEPS:-20}
SMOKE_RECORDS=${SMOKE_RECORDS:-8}
SMOKE_ALSO=${SMOKE_ALSO:-}  # more architectures to smoke-train in bf16, e.g. qwen2-vl-7b
OUT=${OUT:-bench-results}
PYTHON=${PYTHON:-python3}

mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
common=(--model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --json)

save() {  # save NAME COMMAND...: COMMAND's stdout to OUT/NAME.json atomically, so a killed run leaves no half file
  local name=$1
  shift
  echo "== $name: $*" >&2
  local status=0
  "$@" > "$OUT/$name.json.part" || status=$?
  if ((status)); then  # report and go on: the later steps still tell something
    echo "!! $name failed: exit $status" >&2
    rm -f "$OUT/$name.json.part"
    failed+=("$name")
  else
    mv "$OUT/$name.json.part" "$OUT/$name.json"
  fi
}
failed=()
run() {  # run NAME ARGS...: davsp bench ARGS into OUT/NAME.json
  local name=$1
  shift
  save "$name" "$PYTHON" -m davsp bench "$@"
}
smoke=("$PYTHON" scripts/train_smoke.py --model "$MODEL" --device "$DEVICE" --steps "$SMOKE_STEPS"
       --records "$SMOKE_RECORDS")

"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >&2
if [[ $DEVICE != cpu && ${RUN_TESTS:-1} == 1 ]]; then  # RUN_TESTS=0 skips them
  echo "== tests with the tiny models on $DEVICE: $OUT/tests.log" >&2
  status=0
  DAVSP_TEST_DEVICE=$DEVICE timeout "${TESTS_TIMEOUT:-240}" "$PYTHON" -m pytest -p no:cacheprovider \
    tests/test_device.py tests/test_vector.py tests/test_train.py > "$OUT/tests.log" 2>&1 || status=$?
  echo "tests on $DEVICE: exit $status, $(tail -n 1 "$OUT/tests.log")" >&2
fi
save smoke_bfloat16 "${smoke[@]}" --dtype bfloat16
save smoke_paper "${smoke[@]}" --config davsp/configs/paper.yaml
for arch in $SMOKE_ALSO; do
  save "smoke_$arch" "$PYTHON" scripts/train_smoke.py --model "$arch" --device "$DEVICE" --steps "$SMOKE_STEPS" \
    --records "$SMOKE_RECORDS" --dtype bfloat16
done
run train train "${common[@]}" --reference --steps "$STEPS" --warmup 3 --batch-size 2
run generate generate "${common[@]}" --reference --n "$N" --max-new-tokens "$NEW_TOKENS" --batch-size "$N"
run generate_large generate "${common[@]}" --n "$LARGE_N" --max-new-tokens "$NEW_TOKENS" --batch-size "$LARGE_N"
run generate_static generate "${common[@]}" --n "$N" --max-new-tokens "$NEW_TOKENS" --batch-size "$N" --static-cache
ab=("$PYTHON" scripts/decode_attention_ab.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --n "$N"
    --max-new-tokens "$NEW_TOKENS")
save attention_ab bash -c '"$@" --arm cudnn && "$@" --arm without-cudnn' _ "${ab[@]}"
[[ -f $OUT/attention_ab.json ]] && cat "$OUT/attention_ab.json"
"$PYTHON" - "$OUT" $SMOKE_ALSO <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("smoke_bfloat16", "smoke_paper", *(f"smoke_{arch}" for arch in sys.argv[2:])):
    if not (out / f"{name}.json").exists():
        continue
    smoke = json.loads((out / f"{name}.json").read_text())
    keys = ("dtype", "seconds_per_step", "peak_memory_gib", "all_finite", "projection_means")
    # harmful and benign steps alternate, so each kind's loss is followed on its own
    losses = {kind: [row["loss"] for row in smoke["trajectory"] if row["harmful"] == (kind == "harmful")]
              for kind in ("harmful", "benign")}
    print(name, {k: smoke[k] for k in keys},
          "; ".join(f"{kind} loss first {v[0]:.4g} last {v[-1]:.4g}" for kind, v in losses.items() if v))
reports = {name: json.loads((out / f"{name}.json").read_text())
           for name in ("train", "generate", "generate_large", "generate_static") if (out / f"{name}.json").exists()}
sequential = reports["generate"]["reference"]["tokens_per_s"] if "generate" in reports else None  # the one-at-a-time loop, same model and lengths
for name, report in reports.items():
    keys = ("ratio", "ratio_iqr", "ratio_harmful", "ratio_benign", "harmful_tflops_per_s", "harmful_mfu", "same_outputs")
    print(name, {k: report[k] for k in keys if report.get(k) is not None},
          {path: {k: v for k, v in report[path].items() if k in ("batch_size", "samples_per_s", "tokens_per_s", "peak_memory_gib")}
           for path in ("project", "reference") if path in report})
    if name != "train" and sequential:
        print(f"  {name}: {report['project']['tokens_per_s'] / sequential:.1f}x the sequential loop's tokens/s")
PY
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
