#!/usr/bin/env bash
# Every GPU measurement and test of the project in one run, in order of importance, within a time
# budget: a lent GPU machine is usually held for minutes, not hours.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [BUDGET_SECONDS]
#
# Each step writes OUT_DIR/<step>.log, runs under its own time limit (never past the budget) and
# may fail without stopping the next one; OUT_DIR/summary.txt lists each step's exit status
# (124: stopped at its time limit). The steps:
#
#   tests      pytest -m gpu (the compiled, CUDA-graph, loop-graph and fp8 paths against the eager
#              network, the captured caption search against the reference search)
#   sampling   benchmarks/sampling.py at the released size against diffusers: end to end, our
#              time by stage, throughput, network forward against the measured matmul rate,
#              accuracy against eager fp32 (SECTIONS="..." picks others). If it fails before its
#              limit, it runs again uncompiled, eager.
#   variants   our text-to-image at batch 1 per fast-path variant (no diffusers)
#   fp8        our end-to-end times, stages, forward, throughput and accuracy with the blocks'
#              linear layers in fp8 with static scales (calibrated on one call of each task with
#              another prompt and seed; FP8_SECTIONS="..." picks others)
#   parts      benchmarks/parts.py: linear layers bf16 against fp8, attention per SDPA backend,
#              the image decoder eager and compiled
#   train      benchmarks/train.py: the released size in bf16 at batch 16, and at batch 32 with
#              gradient checkpointing, each with and without compiled blocks
#   joint      joint at batch 1 with static fp8 (end to end, then its kernels by kind), as it is and
#              then once per entry of JOINT_OPTIONS (';' between entries), each in its own process
#              (inductor's settings are global): by default the fp8 products' fast accumulation,
#              inductor's multi-kernel reductions (persistent norms over the 1536 columns, chosen by
#              timing) and its coordinate-descent tuning of generated kernels. About 90 s each.
#   data       benchmarks/data.py: a training batch of the shapes model's features read from the
#              files in the training process, by 4 workers, and from memory, latents drawn on the GPU
#
# STEPS="fp8 sampling tests" runs those steps alone, in that order (default: all, in the order
# above): on a short lease, put first what is missing (STEPS=joint: the joint target's leads).
# All of them take about 18 minutes; a lease of 15 minutes of device time leaves about 9 for
# commands after the machine's start: on 2026-11-27 `STEPS="fp8 tests sampling" SECTIONS="e2e
# throughput"` used 545 s of a 545-s budget (fp8 and sampling stopped at their caps inside
# throughput, which now runs last).
#
# PRESET=tiny DEVICE=cpu runs the same steps on the CPU with the tiny components (a smoke test of
# this script; its figures mean nothing).
set -u
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [BUDGET_SECONDS]}
budget=${2:-540}
preset=${PRESET:-unidiffuser-v1}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
end=$(($(date +%s) + budget))

step() {  # step NAME CAP_SECONDS COMMAND...: run COMMAND for at most CAP seconds (and the budget)
    local name=$1 cap=$2
    shift 2
    local left=$((end - $(date +%s)))
    if ((left < 20)); then
        echo "$name: skipped, budget spent" | tee -a "$out/summary.txt"
        return 0
    fi
    ((cap > left)) && cap=$left
    echo "== $name (at most ${cap}s): $*"
    local start=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$cap" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name: exit $rc after $(($(date +%s) - start))s" | tee -a "$out/summary.txt"
    return "$rc"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
    python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| diffusers', diffusers.__version__)"
} | tee "$out/environment.log"

if [[ $preset == tiny ]]; then
    rows=(small:no:0:8 small:no:0:8:1)
    variants=(eager compile compile+vae compile+fp8 compile+fp8s)
    extra=(--backend aot_eager --batch-sizes 2 --forward-batch 2 --steps 5)
    parts=(--small --backend aot_eager --repeats 3)
else
    rows=(unidiffuser-v1:bf16:0:16 unidiffuser-v1:bf16:0:16:1 unidiffuser-v1:bf16:1:32 unidiffuser-v1:bf16:1:32:1)
    variants=(compile+graphs compile+graphs+loop compile+graphs+loop+vae compile+graphs+loop+vae+cudnn
        compile+graphs+loop+vae+fp8 compile+graphs+loop+vae+fp8s)
    extra=()
    parts=()
fi
sections=(${SECTIONS:-e2e stages forward accuracy throughput})

run_step() {  # run_step NAME: one of the steps listed at the top
    case $1 in
    tests)
        step tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_speed.py \
            tests/test_devices.py tests/test_caption_decoder.py
        ;;
    sampling)
        step sampling 300 python3 benchmarks/sampling.py --preset "$preset" --device "$device" \
            --repeats 3 --throughput-repeats 1 --sections "${sections[@]}" "${extra[@]}"
        local rc=$?
        if ((rc != 0 && rc != 124 && rc != 137)); then
            step sampling_eager 200 python3 benchmarks/sampling.py --preset "$preset" --device "$device" \
                --no-compile --no-cuda-graph --repeats 3 --sections e2e stages forward "${extra[@]}"
        fi
        ;;
    variants)
        step variants 160 python3 benchmarks/sampling.py --preset "$preset" --device "$device" --no-diffusers \
            --sections variants --variants "${variants[@]}" --repeats 5 "${extra[@]}"
        ;;
    fp8)
        step fp8 200 python3 benchmarks/sampling.py --preset "$preset" --device "$device" --fp8 \
            --fp8-scaling static --no-diffusers --repeats 3 --throughput-repeats 1 \
            --sections ${FP8_SECTIONS:-e2e stages forward accuracy throughput} "${extra[@]}"
        ;;
    parts) step parts 100 python3 benchmarks/parts.py --device "$device" "${parts[@]}" ;;
    joint)
        local options opt i=0
        IFS=';' read -ra options <<<"${JOINT_OPTIONS:---fp8-fast-accum;--inductor triton.multi_kernel=1;--inductor coordinate_descent_tuning=True}"
        for opt in "" "${options[@]}"; do
            # shellcheck disable=SC2086  # each entry is a list of options
            step "joint$i" 120 python3 benchmarks/sampling.py --preset "$preset" --device "$device" --fp8 \
                --fp8-scaling static --no-diffusers --repeats 5 --sections e2e kernels --tasks joint $opt \
                "${extra[@]}"
            i=$((i + 1))
        done
        ;;
    train) step train 200 python3 benchmarks/train.py --device "$device" --steps 5 --warmup 2 --rows "${rows[@]}" ;;
    data) step data 120 python3 benchmarks/data.py --device "$device" --workers 4 ;;
    *)
        echo "unknown step '$1': expected some of tests sampling variants fp8 parts train joint data" | tee -a "$out/summary.txt"
        ;;
    esac
}

for name in ${STEPS:-tests sampling variants fp8 parts train joint data}; do
    run_step "$name"
done
echo "== summary"
cat "$out/summary.txt"
