#!/usr/bin/env bash
# Every GPU measurement issues 19 and 23 left open (never run yet: no GPU has been lent to this work). Each step has
# its own time limit, so one that hangs or fails does not stop the others. Run it from the repository root on a
# machine with a CUDA GPU and this package installed (`pip install -e ".[gpu]"` for the flash-attn checks):
#
#     bash benchmarks/gpu_checks.sh [OUTPUT_FOLDER]      # default: $OUT, else ./gpu_checks_out
#
# The step limits add up to 1,080 s. Where one command may run at most 10 minutes, run it in two parts chosen with
# STEPS (space-separated step names; default: all), each part's limits adding up to under 600 s:
#
#     STEPS="flash_vs_sdpa generation_sdpa generation_flash_attention_2 vae_decode vae_field_call" \
#         bash benchmarks/gpu_checks.sh out/part1                                              # limits: 560 s
#     STEPS="generation_flex_attention train_memory denoise_compile" bash benchmarks/gpu_checks.sh out/part2  # 520 s
#
# Each step writes its own log into the output folder; `summary.txt` lists every step with its exit status. Copy the
# tables into the README where it says "still to be measured on a GPU", naming the GPU.
#
#   1. flash-attn 2 vs sdpa (issue 23): benchmarks/check_flash_attention.py, the real kernels on the forwards that
#      take the flash path (skipped, saying so, without flash-attn).
#   2. generation at Qwen3-VL-2B's text shape (issues 19 and 23): bench_generation.py, random weights, bfloat16,
#      N = 512 and 4096, the whole-object block sampler, with sdpa, flash-attn 2 and flex attention.
#   3. training-step memory at 2B width (issue 23): bench_train_memory.py --device cuda --dtype bfloat16.
#   4. compiled denoising step (issue 23): bench_denoise_compile.py at 2B width (4 layers), N = 4096, bfloat16.
#   5. VAE decode at octree 256 / 384 (issue 19): bench_vae_decode.py --device cuda (a tiny ShapeVAE fitted to a real
#      mesh, dense vs hierarchical), and one field call at the released decoder size (width 1024, 4096 latents).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUTPUT="${1:-${OUT:-gpu_checks_out}}"
mkdir -p "$OUTPUT"
SUMMARY="$OUTPUT/summary.txt"
: > "$SUMMARY"

STEPS="${STEPS:-all}"
wanted() {  # wanted NAME: whether STEPS selects this step
    [ "$STEPS" = all ] || [[ " $STEPS " == *" $1 "* ]]
}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUTPUT/NAME.txt, record the exit status
    local name="$1" limit="$2"
    shift 2
    wanted "$name" || return 0
    echo "=== $name (limit ${limit} s): $*" | tee -a "$SUMMARY"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUTPUT/$name.txt" 2>&1
    local status=$?
    tail -n 25 "$OUTPUT/$name.txt"
    echo "--- $name: exit $status after $((SECONDS - start)) s" | tee -a "$SUMMARY"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)"
    "$PYTHON" -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null \
        || echo "flash-attn: not installed (the flash-attn steps are skipped)"
} 2>&1 | tee "$OUTPUT/machine.txt" | tee -a "$SUMMARY"

# Qwen3-VL-2B's text decoder: hidden 2048, 28 layers, 16 heads of 128, 8 key/value heads, MLP 6144.
SHAPE_2B=(--hidden-size 2048 --layers 28 --heads 16 --kv-heads 8 --head-dim 128 --intermediate-size 6144)

step flash_vs_sdpa 120 "$PYTHON" benchmarks/check_flash_attention.py --hidden 1024 --layers 4 --rows 1024

for attention in sdpa flash_attention_2 flex_attention; do
    if wanted "generation_$attention" && [ "$attention" = flash_attention_2 ] \
        && ! "$PYTHON" -c "import flash_attn" 2>/dev/null; then
        echo "=== generation_$attention: skipped, flash-attn is not installed" | tee -a "$SUMMARY"
        continue
    fi
    step "generation_$attention" 140 "$PYTHON" benchmarks/bench_generation.py --device cuda --dtype bfloat16 \
        "${SHAPE_2B[@]}" --attn-implementation "$attention" --sizes 512 4096 --samplers block --steps 10 \
        --repeats 2
done

step train_memory 200 "$PYTHON" benchmarks/bench_train_memory.py --device cuda --dtype bfloat16 \
    --sizes 512 1024 2048 4096

step denoise_compile 180 "$PYTHON" benchmarks/bench_denoise_compile.py --device cuda --dtype bfloat16 \
    --hidden 2048 --layers 4 --rows 4096 --steps 10

step vae_decode 100 "$PYTHON" benchmarks/bench_vae_decode.py --device cuda --resolutions 256 384
step vae_field_call 60 "$PYTHON" benchmarks/bench_vae_decode.py --device cuda --latent-kv 8000 32768

echo "logs in $OUTPUT" | tee -a "$SUMMARY"
