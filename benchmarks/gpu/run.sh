#!/usr/bin/env bash
# The GPU check, in one call: the tests that need CUDA, a bf16 fit with activation checkpointing, the
# speed bench (layer and ragged keep-sets, against the FLOPs ideal), the PrunePath Triton kernel, the
# distilled one-run recipe (a timed slice on the stand-in; where the bundled SmolLM2-135M is cached, the
# whole 1M-token budget and `ppn compare` on it) and self-speculative decoding with its keep-sets as drafts.
# Logs and JSON go to $OUT; a short table is printed last. Each step's exit status is recorded and the
# script goes on after a failure (a first GPU run should report every broken path, not the first).
#
#   OUT=/tmp/gpu bash benchmarks/gpu/run.sh                    # on a CUDA machine (about 5-7 minutes with the stand-in)
#   PPN_GPU_SMOKE=1 OUT=/tmp/gpu bash benchmarks/gpu/run.sh    # CPU smoke run of the script itself (~2 min)
#
# The device machine of this workplace has torch, transformers, safetensors, triton and scipy but no
# Pyro and reaches no registry: carry the missing wheels in .whl/ (see .library/device/README.md):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform any -d .whl pyro-ppl==1.9.1 pyro-api==0.1.2 gguf arviz \
#     xarray-einstats datasets dill multiprocess
# This script installs whatever is in .whl/ first. Without the cached SmolLM2 (540 MB, more than a call
# may carry) it builds a random-weight stand-in of SmolLM2-135M's exact shape (benchmarks/gpu/stand_in_model.py):
# speed, memory and "runs on CUDA" are the real model's figures then; perplexities are not, and say so.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ppn-gpu.XXXXXX")
if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PPN_HOME=${PPN_HOME:-$HOME/.cache/ppn-bayes}

if [[ "${PPN_GPU_SMOKE:-0}" == 1 ]]; then
  DEV=cpu; TINY=--tiny; FIT_STEPS=2; FULL_STEPS=2; BENCH=(--batch-sizes 1 --prompt-len 16 --new-tokens 4 --repeats 1 --warmup 0)
  KERNEL=(--device cpu --reps 5 --hidden 64 --intermediate 128); DISTILL_STEPS=2
  SPEC=(--draft-lengths 2 --max-new-tokens 8 --repeats 1); TESTS=(tests/test_fake_devices.py -k "meta or structural")
else
  DEV=cuda; TINY=; FIT_STEPS=40; FULL_STEPS=2000; BENCH=(--batch-sizes 1,8 --prompt-len 128 --new-tokens 64 --repeats 3)
  KERNEL=(--device cuda --dtype bfloat16); DISTILL_STEPS=200
  SPEC=(--draft-lengths 2,4 --max-new-tokens 64 --repeats 3); TESTS=(tests/test_prunepath_triton.py tests/test_fake_devices.py tests/test_distributed_sizing.py -m "not slow")
fi

ROWS=()
step() {  # step NAME SUMMARY-COMMAND -- COMMAND...: run, log to $OUT/NAME.log, keep a table row
  local name=$1 summary=$2; shift 3
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$OUT/steps.log"
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local what
  what=$(eval "$summary" 2>/dev/null | tail -1 | cut -c1-90)
  ROWS+=("$(printf '%-10s %4s %5ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$what")")
  tail -3 "$OUT/$name.log" | sed 's/^/   /'
}

step env "grep -m1 -E 'H200|H100|A100|NVIDIA|cpu' $OUT/env.log" -- bash -c \
  "nvidia-smi -L 2>/dev/null; $PY -c 'import torch, transformers; print(torch.__version__, transformers.__version__, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"cpu only\")'; $PY -c 'import pyro; print(\"pyro\", pyro.__version__)'"
step tests "grep -E 'passed|failed' $OUT/tests.log" -- $PY -m pytest -q -p no:cacheprovider "${TESTS[@]}"
MODEL=$($PY benchmarks/gpu/stand_in_model.py "$WORK/model" $TINY 2>"$OUT/model.log" | tail -1)
REAL=0; [[ "$MODEL" == "$PPN_HOME/models/smollm2-135m" ]] && REAL=1
echo "model: $MODEL (real SmolLM2: $REAL)" | tee -a "$OUT/steps.log"

# bf16 autocast + activation checkpointing, LoRA, layers + heads + groups, low-rank guide (smollm2-full's units)
step fit_bf16 "grep -o '\"seconds\": [0-9.]*' $WORK/fit/metrics.jsonl | tail -1" -- \
  $PY -m ppn_bayes.cli fit inference/smollm2-full.yaml --out "$WORK/fit" --no-progress \
  --set model.name="$MODEL" --set train.device=$DEV --set train.bf16=true --set train.grad_checkpointing=true \
  --set train.steps=$FIT_STEPS --set train.checkpoint_every=$FIT_STEPS --set train.eval_lambdas=[1.0]
step speed "$PY -c \"import json; r=json.load(open('$OUT/speed.json'))['rows']; \
print(' '.join(f\\\"{x['size']}@b{x['batch']}: dec {x['decode_speedup']:.2f}x/ideal {x['decode_ideal']:.2f}x\\\" for x in r if x['size'] < 1))\"" -- \
  bash -c "$PY -m ppn_bayes.cli bench speed --model '$MODEL' --run '$WORK/fit' --sizes 0.75,0.5 --device $DEV \
  ${BENCH[*]} --json > '$OUT/speed.json'"
step speed_layers "$PY -c \"import json; r=json.load(open('$OUT/speed_layers.json'))['rows']; \
print(' '.join(f\\\"{x['size']}@b{x['batch']}: dec {x['decode_speedup']:.2f}x/ideal {x['decode_ideal']:.2f}x\\\" for x in r if x['size'] < 1))\"" -- \
  bash -c "$PY -m ppn_bayes.cli bench speed --model '$MODEL' --sizes 0.75,0.5 --device $DEV ${BENCH[*]} --json \
  > '$OUT/speed_layers.json'"
step kernel "tail -1 $OUT/kernel.log" -- $PY benchmarks/prunepath_kernel.py "${KERNEL[@]}"
# The distilled one-run recipe (inference/smollm2-distill.yaml: LoRA, sandwich, in-place distillation,
# 3 passes a step) at a real budget: 2000 steps x 4 x 128 tokens = 1.02M training tokens, ~1.5 epochs
# of the bundled corpus (~0.7M train tokens). With the real weights it runs the whole budget, then
# `ppn compare` and `ppn speculate` on its keep-sets; with the stand-in (random weights, a device call
# cannot carry SmolLM2) it runs a timed slice of DISTILL_STEPS and projects the budget's wall time
# from its step rate: the CUDA path of distillation and the sandwich runs, perplexities would not mean anything.
if [[ $REAL == 1 ]]; then DISTILL_STEPS=$FULL_STEPS; fi
step distill "$PY -c \"import json; r=[json.loads(l) for l in open('$WORK/distill/metrics.jsonl')]; \
r=[x for x in r if x.get('type')=='train']; s=r[-1]['seconds']; n=r[-1]['step']; \
print(f'{n} steps x 4 x 128 tok in {s:.0f} s; 2000 steps (1.02M tok) ~ {s/n*2000/60:.1f} min')\"" -- \
  $PY -m ppn_bayes.cli fit inference/smollm2-distill.yaml --out "$WORK/distill" --no-progress \
  --set model.name="$MODEL" --set train.device=$DEV --set train.bf16=true --set train.batch_size=4 \
  --set train.steps=$DISTILL_STEPS --set train.checkpoint_every=$DISTILL_STEPS --set train.log_every=1 \
  --set train.warmup_steps=$((DISTILL_STEPS / 20)) --set train.eval_lambdas=[1.0]
step speculate "$PY -c \"import json; r=json.load(open('$OUT/speculate.json'))['trials']; \
print(' '.join(f\\\"{x['size']}/k{x['draft_length']}: acc {x['acceptance_rate']:.2f} {x['speedup']:.2f}x\\\" for x in r))\"" -- \
  bash -c "$PY -m ppn_bayes.cli speculate --model '$MODEL' --run '$WORK/distill' --sizes 0.75,0.5,0.4 \
  --prompt 'It is a truth universally acknowledged' --device $DEV ${SPEC[*]} --json > '$OUT/speculate.json'"
if [[ $REAL == 1 ]]; then
  step compare "tail -1 $OUT/compare.log" -- $PY -m ppn_bayes.cli compare --model "$MODEL" --run "$WORK/distill" \
    --methods ppn,shortgpt,gisp,sparsegpt --sizes 0.75,0.5,0.4 --device $DEV --out "$OUT/compare"
else
  ROWS+=("$(printf '%-10s %4s %5s   %s' compare skip - 'no cached SmolLM2-135M here: quality figures need the real weights')")
fi
cp "$WORK/fit/metrics.jsonl" "$OUT/fit_metrics.jsonl" 2>/dev/null
cp "$WORK/distill/metrics.jsonl" "$OUT/distill_metrics.jsonl" 2>/dev/null
rm -rf "$WORK"
echo
echo "step       exit  time  figure"
printf '%s\n' "${ROWS[@]}" | tee "$OUT/table.txt"
