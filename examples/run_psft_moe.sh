#!/usr/bin/env bash
# PSFT for Qwen3-MoE on Megatron-Core.
#
#   bash examples/run_psft_moe.sh [extra megatron_psft.train flags...]
#
# On a GPU cluster, set PRETRAINED (a checkpoint from checkpoint_convert.hf_to_megatron), DATA_PREFIX
# (from tools/preprocess_data.py; a blend is "W1 PREFIX1 W2 PREFIX2 ...") and SAVE_DIR; the defaults
# are for Qwen3-30B-A3B on H100 nodes (docs/run_script.md lists every variable).
# Launch it on every node, or once per node under SLURM.
#
# With nothing set on a machine without a GPU it runs the embedded default: a tiny Qwen3-MoE-shaped
# model on the bundled chat data and tokenizer, 4 CPU processes over gloo (TP2 x EP2 with sequence
# parallelism, DP2), SFT warm-up then PSFT rounds evaluated on a held-out slice of the data, a
# checkpoint, and an HF export of it.
#
# DRY_RUN=1 resolves every flag as the launch would and prints the plan (layout, parameters and
# memory per GPU) without a GPU, data or weights, e.g. DRY_RUN=1 HF_CONFIG=30b-a3b NNODES=2.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the package runs from a checkout without installing

DRY_RUN=${DRY_RUN:-0}
# CUDA_VISIBLE_DEVICES="" hides the GPUs, as it does from torch.
has_gpu() {
  [ "${CUDA_VISIBLE_DEVICES-unset}" != "" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU
}

# The embedded default: no GPU and no cluster variable set.
if [ -z "${PRETRAINED:-}${DATA_PREFIX:-}${HF_CONFIG:-}${NNODES:-}${SLURM_JOB_ID:-}" ] && ! has_gpu; then
  EMBEDDED=1
  PYTHON=${PYTHON:-$(bash "$ROOT/tools/setup_env.sh")}
  RUN_DIR=${RUN_DIR:-$ROOT/runs/embedded}
  GPUS_PER_NODE=${GPUS_PER_NODE:-4}
  TP=${TP:-2}; PP=${PP:-1}; EP=${EP:-2}; ETP=${ETP:-}; SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-1}
  HF_CONFIG=${HF_CONFIG:-debug}
  SEQ_LENGTH=${SEQ_LENGTH:-128}; MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}; GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-16}
  TRAIN_ITERS=${TRAIN_ITERS:-36}; SFT_WARMUP_STEPS=${SFT_WARMUP_STEPS:-12}; SFT_WARMUP_LR=${SFT_WARMUP_LR:-2e-3}
  # A randomly initialised toy model needs a far larger step than the paper's 1e-6 to move visibly.
  LR=${LR:-1e-3}; LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-4}
  OLD_POLICY_INTERVAL=${OLD_POLICY_INTERVAL:-4}
  LOG_INTERVAL=${LOG_INTERVAL:-2}
  PARAMS_DTYPE=${PARAMS_DTYPE:-fp32}; FP8_FORMAT=${FP8_FORMAT:-}; MOE_GROUPED_GEMM=${MOE_GROUPED_GEMM:-0}
  RECOMPUTE_GRANULARITY=${RECOMPUTE_GRANULARITY:-}
  # The bundled data's last HELD_OUT conversations are held out (and every copy of them dropped from
  # training: the data is templated, so some conversations repeat) and evaluated as the set "heldout".
  HELD_OUT=32
  DATA_PREFIX=$RUN_DIR/data/chat_train; HELD_OUT_PREFIX=$RUN_DIR/data/chat_heldout
  EVAL_DATA=${EVAL_DATA-heldout=$HELD_OUT_PREFIX}; EVAL_INTERVAL=${EVAL_INTERVAL:-12}
  TOKENIZER=${TOKENIZER:-$ROOT/megatron_psft/assets/tokenizer}
  SAVE_DIR=${SAVE_DIR:-$RUN_DIR/checkpoints}
  EXPORT_HF_DIR=${EXPORT_HF_DIR:-$RUN_DIR/hf_export}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  EMBEDDED=0
  PYTHON=${PYTHON:-python}
  if [ "$DRY_RUN" = 1 ]; then  # the plan needs only the model's HF config
    [ -n "${PRETRAINED:-}${HF_CONFIG:-}" ] || { echo "set PRETRAINED (its hf_config.json is read) or HF_CONFIG" >&2; exit 2; }
  else
    : "${PRETRAINED:?set PRETRAINED to a Megatron checkpoint (python -m checkpoint_convert.hf_to_megatron)}"
    : "${DATA_PREFIX:?set DATA_PREFIX to the --output-prefix of tools/preprocess_data.py}"
    : "${SAVE_DIR:?set SAVE_DIR to the checkpoint directory of this run}"
  fi
  GPUS_PER_NODE=${GPUS_PER_NODE:-8}
  # Qwen3-30B-A3B on H100 (2 nodes and up): experts over 8 GPUs, attention over TP2 with SP.
  # FP8 with current (tensorwise) scaling: megatron-core refuses delayed scaling with the moe_act /
  # layernorm recompute below, and a current-scaling recipe keeps no amax history for PSFT's
  # forward-only old-policy pass to disturb (docs/run_script.md).
  TP=${TP:-2}; PP=${PP:-1}; EP=${EP:-8}; ETP=${ETP:-1}; SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-1}
  HF_CONFIG=${HF_CONFIG:-}
  SEQ_LENGTH=${SEQ_LENGTH:-4096}; MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}; GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-32}
  TRAIN_ITERS=${TRAIN_ITERS:-1000}; SFT_WARMUP_STEPS=${SFT_WARMUP_STEPS:-0}; SFT_WARMUP_LR=${SFT_WARMUP_LR:-}
  LR=${LR:-1e-6}; LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-10}
  OLD_POLICY_INTERVAL=${OLD_POLICY_INTERVAL:-8}  # round batch 256 / global batch 32, as in the paper
  LOG_INTERVAL=${LOG_INTERVAL:-10}
  PARAMS_DTYPE=${PARAMS_DTYPE:-bf16}; FP8_FORMAT=${FP8_FORMAT-hybrid}; MOE_GROUPED_GEMM=${MOE_GROUPED_GEMM:-1}
  RECOMPUTE_GRANULARITY=${RECOMPUTE_GRANULARITY-selective}  # set empty for no recompute
  EXPORT_HF_DIR=${EXPORT_HF_DIR:-}
  TOKENIZER=${TOKENIZER:-${HF_TEMPLATE:-}}  # the HF model directory: its tokenizer must match the data's
  EVAL_DATA=${EVAL_DATA:-}; EVAL_INTERVAL=${EVAL_INTERVAL:-100}
fi
OBJECTIVE=${OBJECTIVE:-psft}; EPS_LOW=${EPS_LOW:-0.2}; EPS_HIGH=${EPS_HIGH:-0.28}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.1}; CLIP_GRAD=${CLIP_GRAD:-1.0}; LR_DECAY_STYLE=${LR_DECAY_STYLE:-cosine}
MOE_DISPATCHER=${MOE_DISPATCHER:-alltoall}; MOE_ROUTER_REPLAY=${MOE_ROUTER_REPLAY:-0}
FP8_RECIPE=${FP8_RECIPE:-tensorwise}; RECOMPUTE_MODULES=${RECOMPUTE_MODULES:-moe_act layernorm}
SAVE_INTERVAL=${SAVE_INTERVAL:-0}; SEED=${SEED:-1234}; TIMING_LOG_LEVEL=${TIMING_LOG_LEVEL:-1}
SAVE_DIR=${SAVE_DIR:-}
EVAL_ITERS=${EVAL_ITERS:-}
# Whole samples packed into each SEQ_LENGTH row: padding is computed like any token, experts included.
PACK_SEQUENCES=${PACK_SEQUENCES:-1}
OLD_POLICY_MICRO_BATCH_SIZE=${OLD_POLICY_MICRO_BATCH_SIZE:-}; FUSED_LOGPROBS=${FUSED_LOGPROBS:-auto}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-${SAVE_DIR:+$SAVE_DIR/tensorboard}}

# --- launcher: torchrun, on one or many nodes, or under SLURM ------------------------------------
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${NNODES:-}" ]; then
  NNODES=${SLURM_NNODES:-1}
  NODE_RANK=${SLURM_NODEID:-0}
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
fi
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}; MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}

# (Re)preprocess the bundled data when it is missing or was written in an older format.
data_is_current() {  # PREFIX
  [ -f "$1.meta.json" ] && "$PYTHON" -c 'import json, sys; from megatron_psft.data import FORMAT_VERSION
sys.exit(json.load(open(sys.argv[1])).get("format_version") != FORMAT_VERSION)' "$1.meta.json"
}
if [ "$EMBEDDED" = 1 ] && [ "$DRY_RUN" != 1 ] && ! { data_is_current "$DATA_PREFIX" && data_is_current "$HELD_OUT_PREFIX"; }; then
  mkdir -p "$RUN_DIR/data"
  CHAT_DATA=$ROOT/megatron_psft/assets/chat_data.jsonl
  tail -n "$HELD_OUT" "$CHAT_DATA" > "$HELD_OUT_PREFIX.jsonl"
  head -n $(($(wc -l < "$CHAT_DATA") - HELD_OUT)) "$CHAT_DATA" | grep -vxFf "$HELD_OUT_PREFIX.jsonl" > "$DATA_PREFIX.jsonl"
  for prefix in "$DATA_PREFIX" "$HELD_OUT_PREFIX"; do
    "$PYTHON" "$ROOT/tools/preprocess_data.py" --input "$prefix.jsonl" --output-prefix "$prefix" \
      --tokenizer "$ROOT/megatron_psft/assets/tokenizer" --seq-length "$SEQ_LENGTH"
  done
fi

ARGS=(
  --seq-length "$SEQ_LENGTH"
  --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE" --train-iters "$TRAIN_ITERS"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP"
  --moe-token-dispatcher-type "$MOE_DISPATCHER" --params-dtype "$PARAMS_DTYPE"
  --objective "$OBJECTIVE" --eps-low "$EPS_LOW" --eps-high "$EPS_HIGH" --old-policy-interval "$OLD_POLICY_INTERVAL"
  --sft-warmup-steps "$SFT_WARMUP_STEPS"
  --lr "$LR" --lr-warmup-iters "$LR_WARMUP_ITERS" --lr-decay-style "$LR_DECAY_STYLE"
  --weight-decay "$WEIGHT_DECAY" --clip-grad "$CLIP_GRAD"
  --save-interval "$SAVE_INTERVAL" --seed "$SEED" --log-clipped-tokens
  --log-interval "$LOG_INTERVAL" --timing-log-level "$TIMING_LOG_LEVEL"
  --exit-signal-handler  # SIGTERM (preemption, time limit): finish the step, save, exit 0
)
[ -n "${EXIT_DURATION_IN_MINS:-}" ] && ARGS+=(--exit-duration-in-mins "$EXIT_DURATION_IN_MINS")
[ -n "${WANDB_PROJECT:-}" ] && ARGS+=(--wandb-project "$WANDB_PROJECT" --wandb-exp-name "${WANDB_EXP_NAME:-$(basename "${SAVE_DIR:-psft}")}")
if [ -n "${DATA_PREFIX:-}" ]; then  # "PREFIX", or a blend "W1 PREFIX1 W2 PREFIX2 ..."
  read -r -a DATA_ITEMS <<< "$DATA_PREFIX"
  ARGS+=(--data-prefix "${DATA_ITEMS[@]}")
fi
if [ -n "$EVAL_DATA" ]; then  # "NAME=PREFIX NAME=PREFIX"
  read -r -a EVAL_SETS <<< "$EVAL_DATA"
  ARGS+=(--eval-data-prefix "${EVAL_SETS[@]}" --eval-interval "$EVAL_INTERVAL")
  [ -n "$EVAL_ITERS" ] && ARGS+=(--eval-iters "$EVAL_ITERS")
fi
[ -n "$TOKENIZER" ] && ARGS+=(--tokenizer "$TOKENIZER")
[ -n "$SAVE_DIR" ] && ARGS+=(--save "$SAVE_DIR" --load "$SAVE_DIR")
[ -n "$TENSORBOARD_DIR" ] && ARGS+=(--tensorboard-dir "$TENSORBOARD_DIR")
[ -n "$ETP" ] && ARGS+=(--expert-tensor-parallel-size "$ETP")
[ "$SEQUENCE_PARALLEL" = 1 ] && ARGS+=(--sequence-parallel)
[ -n "${PRETRAINED:-}" ] && ARGS+=(--pretrained-checkpoint "$PRETRAINED")
[ -n "$HF_CONFIG" ] && ARGS+=(--hf-config "$HF_CONFIG")
[ -n "$SFT_WARMUP_LR" ] && ARGS+=(--sft-warmup-lr "$SFT_WARMUP_LR")
[ -n "$FP8_FORMAT" ] && ARGS+=(--fp8-format "$FP8_FORMAT" --fp8-recipe "$FP8_RECIPE")
if [ "$MOE_GROUPED_GEMM" = 1 ]; then ARGS+=(--moe-grouped-gemm); else ARGS+=(--no-moe-grouped-gemm); fi
[ "$MOE_ROUTER_REPLAY" = 1 ] && ARGS+=(--moe-router-replay)
[ "$PACK_SEQUENCES" = 1 ] && ARGS+=(--pack-sequences)
[ -n "$OLD_POLICY_MICRO_BATCH_SIZE" ] && ARGS+=(--old-policy-micro-batch-size "$OLD_POLICY_MICRO_BATCH_SIZE")
case "$FUSED_LOGPROBS" in 1) FUSED_LOGPROBS=on ;; 0) FUSED_LOGPROBS=off ;; esac  # the older 1/0 spelling
ARGS+=(--fused-logprobs "$FUSED_LOGPROBS")
# shellcheck disable=SC2206
[ -n "$RECOMPUTE_GRANULARITY" ] && ARGS+=(--recompute-granularity "$RECOMPUTE_GRANULARITY" --recompute-modules $RECOMPUTE_MODULES)

if [ "$DRY_RUN" = 1 ]; then  # one process, as each rank would resolve its flags
  [ "$EMBEDDED" = 1 ] && ARGS+=(--dry-run-platform cpu)
  WORLD_SIZE=$((NNODES * GPUS_PER_NODE)) exec "$PYTHON" -m megatron_psft.train --dry-run "${ARGS[@]}" "$@"
fi

echo "[run_psft_moe] $NNODES node(s) x $GPUS_PER_NODE processes, TP=$TP PP=$PP EP=$EP, objective $OBJECTIVE, save $SAVE_DIR"
"$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m megatron_psft.train "${ARGS[@]}" "$@"

if [ -n "$EXPORT_HF_DIR" ] && [ "$NODE_RANK" = 0 ]; then
  TEMPLATE=${HF_TEMPLATE:-}
  if [ "$EMBEDDED" = 1 ]; then  # the tiny model's HF side: its config and the bundled tokenizer
    TEMPLATE=$RUN_DIR/hf_template
    mkdir -p "$TEMPLATE"
    cp "$ROOT/megatron_psft/models/qwen3_moe/configs/debug.json" "$TEMPLATE/config.json"
    cp "$ROOT"/megatron_psft/assets/tokenizer/* "$TEMPLATE/"
  fi
  : "${TEMPLATE:?set HF_TEMPLATE to the original HF model directory (config + tokenizer) for the export}"
  "$PYTHON" -m checkpoint_convert.megatron_to_hf --megatron-dir "$SAVE_DIR" --hf-dir-template "$TEMPLATE" \
    --out-dir "$EXPORT_HF_DIR" --overwrite
  "$PYTHON" "$ROOT/tools/clipped_tokens.py" --clipped-tokens "$SAVE_DIR/clipped_tokens.jsonl" \
    --tokenizer "$TEMPLATE" --top 20 --image "$SAVE_DIR/clipped_tokens.svg"
fi
