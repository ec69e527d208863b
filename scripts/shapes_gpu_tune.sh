#!/usr/bin/env bash
# Tune the shipped shapes model's U-ViT further on a GPU, within a time budget, and score it.
#
#   bash scripts/shapes_gpu_tune.sh OUT_DIR [BUDGET_SECONDS]
#
# The shipped network continues its tune stage (clean conditions, the image latent's loss weighed
# 10 and the text latent's 3, as in `unidiffuser recipe shapes`) at a GPU's batch size, on the
# recipe's 60,000 train-split scenes extracted with the shipped encoders. It trains for as many
# steps as fit the budget: the first PROBE_STEPS measure the rate, then the run resumes with its
# full length (the rate falls to 0 over its last fifth). OUT_DIR receives:
#
#   network.safetensors  the tuned EMA weights in fp16 (copy into src/unidiffuser/models/shapes
#                        only if eval.md beats the shipped model's 192-sample figures)
#   eval.md              unidiffuser eval shapes --seed 1 --samples 192 --steps 50 --guidance 3
#                        (the settings of the shipped model's figures in the README)
#   log.jsonl, summary.txt, *.log   the training log, each step's exit status and output
#
# Options (environment): DEVICE (cuda), BATCH (256), LR (2e-4), EXAMPLES (60000), EVAL_SAMPLES
# (192), EVAL_STEPS (50), SEED (15: the tune's data order and noise), PROBE_STEPS (300),
# EVAL_RESERVE (150 s kept for saving and scoring), MIXED_PRECISION (bf16 on cuda, no elsewhere),
# IN_MEMORY (1: the features read into memory once, `train --data-in-memory`; 1 on cuda, 0
# elsewhere), NUM_WORKERS (with IN_MEMORY=0, processes reading the features ahead: 4 on cuda, 0
# elsewhere), COMPILE (1:
# torch.compile the network for training; default 0), SNR_GAMMA (`train --snr-gamma`: Min-SNR
# weighting over timesteps, for instance 5; default 0, as the shipped model was tuned), INIT (a model directory whose network the
# tune starts from, e.g. the shipped one with an earlier run's network.safetensors copied in: a
# run longer than one lease, lease by lease; `scratch`: an untrained U-ViT from the seed; default
# the shipped model), FROZEN_FROM (the model folder whose tokenizers, CLIP, autoencoder and
# caption decoder make the features, for instance a recipe's OUT/components trained with
# `--set clip_colourless=0.5`; default shipped), COLOURLESS (a share such as 0.5: first train a
# CLIP here with that share of its pairs colourless, `recipe shapes --stage tokenizers --stage clip
# --set clip_colourless=V` with CLIP_STEPS steps (default the recipe's 5000), probe its image tower
# (probe-tower.log), and use the shipped model with that image tower as FROZEN_FROM and INIT), WORK (a temporary
# folder; scenes, features and the run already there are reused and resumed). On one H100
# (2026-11-27) a budget of 420 s gave 94 s of rendering and extraction, the probe, and 1300 steps
# at about 2,900 samples a second, with 4 workers reading the files (the in-memory default is newer
# and not yet timed on a GPU). A CPU check of the script (its model means nothing):
#   DEVICE=cpu BATCH=8 EXAMPLES=256 EVAL_SAMPLES=2 EVAL_STEPS=2 PROBE_STEPS=20 EVAL_RESERVE=60 \
#       IN_MEMORY=1 bash scripts/shapes_gpu_tune.sh /tmp/out 200
set -u
out=${1:?usage: bash scripts/shapes_gpu_tune.sh OUT_DIR [BUDGET_SECONDS]}
budget=${2:-540}
device=${DEVICE:-cuda}
batch=${BATCH:-256}
lr=${LR:-2e-4}
examples=${EXAMPLES:-60000}
eval_samples=${EVAL_SAMPLES:-192}
eval_steps=${EVAL_STEPS:-50}
seed=${SEED:-15}
probe_steps=${PROBE_STEPS:-300}
if [[ $device == cuda ]]; then precision=${MIXED_PRECISION:-bf16} workers=${NUM_WORKERS:-4} in_memory=${IN_MEMORY:-1}; else
    precision=${MIXED_PRECISION:-no} workers=${NUM_WORKERS:-0} in_memory=${IN_MEMORY:-0}; fi
data_flags=(--num-workers "$workers")
[[ $in_memory == 1 ]] && data_flags=(--data-in-memory --num-workers 0)
eval_reserve=${EVAL_RESERVE:-150}
work=${WORK:-$(mktemp -d)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
end=$(($(date +%s) + budget))
ud=(python3 -m unidiffuser.cli)

# A deliberate twin of benchmarks/gpu_check.sh's step, without its time cap: here only the tune
# and the evaluation are bounded, each by `timeout` with its own share of the budget.
step() { # step NAME COMMAND...: run COMMAND, keep its output in OUT_DIR/NAME.log, record its exit status
    local name=$1
    shift
    echo "== $name: $*"
    local start=$(date +%s)
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name: exit $rc after $(($(date +%s) - start))s" | tee -a "$out/summary.txt"
    return "$rc"
}

seconds_left() { # seconds_left [RESERVE]: seconds to the budget's end less RESERVE, at least 1
    local left=$((end - $(date +%s) - ${1:-0}))
    echo $((left > 1 ? left : 1))
}

tune_command() { # tune_command STEPS DECAY: sets run_args to the tune stage's last phase, into WORK/shapes/tune,
    # where the recipe's model stage looks
    run_args=("${ud[@]}" train --data "$work/shapes/features" --init-from "$init"
        --output-dir "$work/shapes/tune" --steps "$1" --batch-size "$batch" --lr "$lr" --warmup-steps 100
        --decay-steps "$2" --ema-decay 0.999 --clean-prob 0.5 --loss-weight img=10
        --loss-weight text=3 --snr-gamma "${SNR_GAMMA:-0}" --checkpoint-every 1000 --keep-last 2 --log-every 50 --seed "$seed" --resume
        --mixed-precision "$precision" "${data_flags[@]}" "${compile_flag[@]}")
}

shipped=$(python3 -c "from unidiffuser.shipped import shipped_model_dir; print(shipped_model_dir())") || exit
frozen=${FROZEN_FROM:-shipped}
init=${INIT:-$shipped}
if [[ -n ${COLOURLESS:-} ]]; then # the shipped model with an image tower that writes shape apart from colour
    clip_run=("${ud[@]}" recipe shapes --out "$work/clip" --device "$device" --stage tokenizers --stage clip
        --set "clip_colourless=$COLOURLESS")
    [[ -n ${CLIP_STEPS:-} ]] && clip_run+=(--set "clip_steps=$CLIP_STEPS")
    step clip "${clip_run[@]}" || exit
    step probe-tower python3 -m unidiffuser.shapes.composition --image-encoder "$work/clip/clip/image_encoder" ||
        exit
    frozen=$work/colourless
    if [[ ! -d $frozen ]]; then # assembled whole or not at all
        rm -rf "$frozen.tmp" && cp -r "$shipped" "$frozen.tmp" && rm -rf "$frozen.tmp/image_encoder" &&
            cp -r "$work/clip/clip/image_encoder" "$frozen.tmp/image_encoder" && mv "$frozen.tmp" "$frozen" || exit
    fi
    init=${INIT:-$frozen}
fi
[[ $init == scratch ]] && init=$work/shapes/components # the recipe's untrained U-ViT, from the seed
[[ $init == "$work/shapes/components" || -f $init/network.safetensors ]] ||
    { echo "INIT=$init: no network.safetensors there" >&2; exit 2; }
compile_flag=()
[[ ${COMPILE:-0} == 1 ]] && compile_flag=(--compile)
# the recipe's run folder (its options must stay the same from call to call)
recipe=("${ud[@]}" recipe shapes --out "$work/shapes" --frozen-from "$frozen" --device "$device" --set "examples=$examples")
step prepare "${recipe[@]}" --stage components --stage data --stage features || exit

# The rate: the second half of the probe's steps, past start-up and the first allocations.
tune_command "$probe_steps" 0
step probe "${run_args[@]}" || exit
rate=$(python3 -c '
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
late = [r["samples_per_s"] for r in rows if "samples_per_s" in r and r["step"] > int(sys.argv[3]) // 2]
print(sum(late) / len(late) / int(sys.argv[2]))
' "$work/shapes/tune/log.jsonl" "$batch" "$probe_steps") || exit
left=$(seconds_left "$eval_reserve")
steps=$(python3 -c "print($probe_steps + max(0, int($rate * $left * 0.85)) // 100 * 100)")
echo "probe: $rate steps/s; $left s left for training: to step $steps" | tee -a "$out/summary.txt"

# Never past the budget: a run stopped early still leaves its newest checkpoint.
tune_command "$steps" "$(((steps - probe_steps) / 5))"
step tune timeout --signal=TERM --kill-after=10 "$(seconds_left $((eval_reserve / 2)))" "${run_args[@]}"
cp "$work/shapes/tune/log.jsonl" "$out/log.jsonl"
rm -rf "$work/shapes/model" # the recipe's model stage: the tune's newest EMA with the components
step save "${recipe[@]}" --stage model || exit
step convert "${ud[@]}" convert "$work/shapes/model" "$work/model-fp16" --dtype fp16 &&
    cp "$work/model-fp16/network.safetensors" "$out/network.safetensors"
step eval timeout --signal=TERM --kill-after=10 "$(seconds_left)" "${ud[@]}" eval shapes \
    --model "$work/shapes/model" --seed 1 --samples "$eval_samples" --steps "$eval_steps" --guidance 3 \
    --batch-size "$eval_samples" --device "$device" --out "$out/eval.md"
