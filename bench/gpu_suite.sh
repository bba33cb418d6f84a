#!/usr/bin/env bash
# Every GPU measurement the issues ask for, in one run (target: under 8 minutes on one
# H100-class GPU). Writes bench/results/gpu_suite.json: one entry per measurement with
# its status: "measured" (its benchmark's own JSON copied under bench/results/gpu/),
# "failed" (with the log's tail), "missing-input" (a file it needs is not on the
# host), or "not-wired" (its benchmark cannot target a GPU yet). Nothing here
# invents a figure: a missing measurement is reported as missing.
#
#   bash bench/gpu_suite.sh            # on a host with a CUDA device and the venv built
#
# Inputs not in the repository: diffusers' reference scripts at commit 58eb52c in
# var/bench/diffusers/ (git show 58eb52c:examples/dreambooth/train_dreambooth_lora.py
# from a diffusers checkout; carry var/bench/diffusers to a device machine).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=bench/results/gpu_suite.json
STEPS=()

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_suite: no CUDA device here; nothing measured" >&2
  exit 2
fi
"$PY" -c 'import torch; print("gpu_suite on", torch.cuda.get_device_name(0))'

not_wired() {  # not_wired NAME WHY: a measurement an issue asks for that has no GPU path yet
  echo "== $1: NOT WIRED ($2)"
  STEPS+=("{\"name\": \"$1\", \"status\": \"not-wired\", \"why\": \"$2\"}")
}

missing_input() {  # missing_input NAME WHY
  echo "== $1: MISSING INPUT ($2)"
  STEPS+=("{\"name\": \"$1\", \"status\": \"missing-input\", \"why\": \"$2\"}")
}

measure() {  # measure NAME RESULT_JSON CMD...: run a benchmark, keep its JSON under gpu/
  local name=$1 result=$2 log
  shift 2
  log=$(mktemp)
  echo "== $name: $*"
  local started=$SECONDS
  if "$@" 2>&1 | tee "$log"; then
    mkdir -p bench/results/gpu
    cp "$result" "bench/results/gpu/$name.json"
    STEPS+=("{\"name\": \"$name\", \"status\": \"measured\", \"seconds\": $((SECONDS - started)), \"result\": \"bench/results/gpu/$name.json\"}")
  else
    local tail_text
    tail_text=$(tail -c 600 "$log" | "$PY" -c 'import json, sys; print(json.dumps(sys.stdin.read()))')
    STEPS+=("{\"name\": \"$name\", \"status\": \"failed\", \"log_tail\": $tail_text}")
  fi
  rm -f "$log"
}

# Fashion CLIP (issue 10): embedding throughput of tiny and ViT-B-16, head-only vs full
# re-embed. bench/clip_embed.py runs where torch puts the models: CPU until it takes
# a device option.
not_wired "clip_embed_vit_b_16" "bench/clip_embed.py has no --device option yet (CPU only)"
not_wired "clip_finetune_step" "no benchmark times a fine-tuning step on a device yet"
# DreamBooth-LoRA (issues 4, 11): SD 1.5 at 512 and SDXL at 1024, s/step and peak VRAM per
# preset beside diffusers' reference scripts.
REFERENCE_SD15=var/bench/diffusers/train_dreambooth_lora.py
if [ -f "$REFERENCE_SD15" ]; then
  # Reference (fp32 and bf16), atelier at equal settings and its sd15 preset (bf16
  # weights): s/step and the training's peak VRAM, one repeat of 12 steps at 512 px.
  measure dreambooth_sd15_512 bench/results/dreambooth_vs_reference.json \
    "$PY" -m bench.dreambooth_vs_reference --device cuda --resolution 512 --steps 12 \
    --dtype bfloat16 --reference-script "$REFERENCE_SD15"
else
  missing_input "dreambooth_sd15_512" "no $REFERENCE_SD15 (see the header)"
fi
not_wired "dreambooth_sdxl_1024" "no SDXL side-by-side benchmark yet (bench/sdxl_checkpoint.py only builds the checkpoint)"
# Inference with and without torch.compile, LoRA switches (issue 4).
not_wired "inference_compile" "no benchmark of generation with ATELIER_COMPILE_UNET on a device yet"
not_wired "lora_switch_gpu" "bench/lora_switch.py runs on the CPU only"
# Spin video (issue 15): not built yet.
not_wired "spin_video" "the spin video is not built yet (issue 15)"

{
  echo "{\"benchmark\": \"gpu_suite\", \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\", \"steps\": ["
  (IFS=,; echo "${STEPS[*]}")
  echo "]}"
} > "$OUT"
echo "wrote $OUT"
