#!/usr/bin/env bash
# The paper's claim at toy scale, on CPU: does PSFT keep SFT's in-domain gains while preserving the
# out-of-domain ability and the entropy?
#
#   bash examples/toy_fidelity.sh [OUT_DIR]          # default OUT_DIR: runs/toy_fidelity
#
# 1. Two synthetic chat domains, A ("numbers") and B ("words"), with held-out eval splits
#    (examples/toy_fidelity/make_domains.py), tokenised with the bundled tokenizer.
# 2. The tiny Qwen3-MoE (--hf-config debug) trained from random initialisation on A (plain SFT).
# 3. From those weights, one fine-tuning run on B per objective (SFT, PSFT, iw-SFT), with the same
#    steps, learning rate, seed and data order, evaluating the NLL and entropy on both held-out
#    splits at step 0, every EVAL_INTERVAL steps and at the end.
# 4. OUT_DIR/table.md (last step and matched in-domain NLL, examples/toy_fidelity/summarise.py),
#    OUT_DIR/tradeoff.png (out-of-domain NLL and entropy against in-domain NLL) and OUT_DIR/curves.png
#    (python -m megatron_psft.reports.plot: every metric against the step).
#
# SETTING=full (default: 7.5 CPU-minutes; 18 min wall on a shared, loaded 2-core machine) or
# SETTING=smoke (the test's, seconds of training; its numbers mean nothing). Every knob below is a
# variable: e.g. LR=1e-3 OLD_POLICY_INTERVAL=8 EPS_HIGH=0.1 OBJECTIVES="sft psft".
# One process per run (1 rank, gloo on CPU; a GPU is used where there is one).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the package runs from a checkout without installing
PYTHON=${PYTHON:-$(bash "$ROOT/tools/setup_env.sh")}
OUT_DIR=${1:-${OUT_DIR:-$ROOT/runs/toy_fidelity}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

SETTING=${SETTING:-full}
case "$SETTING" in
  full)
    TRAIN_SAMPLES=${TRAIN_SAMPLES:-2048}; EVAL_SAMPLES=${EVAL_SAMPLES:-128}
    PRETRAIN_ITERS=${PRETRAIN_ITERS:-300}; FINETUNE_ITERS=${FINETUNE_ITERS:-200}
    GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-32}; EVAL_INTERVAL=${EVAL_INTERVAL:-10} ;;
  smoke)
    TRAIN_SAMPLES=${TRAIN_SAMPLES:-64}; EVAL_SAMPLES=${EVAL_SAMPLES:-16}
    PRETRAIN_ITERS=${PRETRAIN_ITERS:-3}; FINETUNE_ITERS=${FINETUNE_ITERS:-4}
    GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-8}; EVAL_INTERVAL=${EVAL_INTERVAL:-2} ;;
  *) echo "SETTING must be full or smoke, not '$SETTING'" >&2; exit 2 ;;
esac
OBJECTIVES=${OBJECTIVES:-sft psft iw-sft}
SEQ_LENGTH=${SEQ_LENGTH:-72}  # the longest conversation of either domain is 64 tokens
PRETRAIN_LR=${PRETRAIN_LR:-2e-3}
# A randomly initialised toy model needs a far larger step than the paper's 1e-6 to move visibly.
LR=${LR:-3e-4}; LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-5}
OLD_POLICY_INTERVAL=${OLD_POLICY_INTERVAL:-4}; EPS_HIGH=${EPS_HIGH:-0.28}
SEED=${SEED:-1234}

DATA=$OUT_DIR/data
mkdir -p "$DATA" "$OUT_DIR/runs"
"$PYTHON" "$ROOT/examples/toy_fidelity/make_domains.py" --out-dir "$DATA" \
  --train-samples "$TRAIN_SAMPLES" --eval-samples "$EVAL_SAMPLES"
for split in a_train a_eval b_train b_eval; do
  "$PYTHON" "$ROOT/tools/preprocess_data.py" --input "$DATA/$split.jsonl" --output-prefix "$DATA/$split" \
    --tokenizer "$ROOT/megatron_psft/assets/tokenizer" --seq-length "$SEQ_LENGTH"
done

COMMON=(
  --hf-config debug --tokenizer "$ROOT/megatron_psft/assets/tokenizer" --seed "$SEED"
  --seq-length "$SEQ_LENGTH" --micro-batch-size "$GLOBAL_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
  --eval-data-prefix "A=$DATA/a_eval" "B=$DATA/b_eval"
)
train() {  # one process; --standalone picks a free port, so concurrent runs on one machine do not collide
  "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 -m megatron_psft.train "${COMMON[@]}" "$@"
}

# Pre-training on A from random initialisation: without a checkpoint in --load (nor
# --pretrained-checkpoint) the trainer initialises the model from --seed. A rerun with the same
# OUT_DIR resumes the finished run (nothing left to train); the trainer refuses it if the settings
# changed (data, batch, seed, schedule): remove OUT_DIR/pretrain_a then. PRETRAINED reuses another
# directory's pre-training for a sweep of the fine-tuning knobs.
if [ -z "${PRETRAINED:-}" ]; then
  PRETRAINED=$OUT_DIR/pretrain_a
  echo "[toy_fidelity] pre-training on A: $PRETRAIN_ITERS steps at lr $PRETRAIN_LR"
  train --data-prefix "$DATA/a_train" --objective sft --train-iters "$PRETRAIN_ITERS" --lr "$PRETRAIN_LR" \
    --min-lr "$(awk -v lr="$PRETRAIN_LR" 'BEGIN { print lr / 10 }')" --lr-warmup-iters "$(( (PRETRAIN_ITERS + 14) / 15 ))" \
    --lr-decay-style cosine --eval-interval "$PRETRAIN_ITERS" --log-interval "$EVAL_INTERVAL" \
    --save "$PRETRAINED" --load "$PRETRAINED"
fi

RUN_ARGS=()
for objective in $OBJECTIVES; do
  run=$OUT_DIR/runs/$objective
  rm -rf "$run"; mkdir -p "$run"
  echo "[toy_fidelity] fine-tuning on B with $objective: $FINETUNE_ITERS steps at lr $LR"
  train --data-prefix "$DATA/b_train" --pretrained-checkpoint "$PRETRAINED" --objective "$objective" \
    --train-iters "$FINETUNE_ITERS" --lr "$LR" --lr-warmup-iters "$LR_WARMUP_ITERS" --lr-decay-style constant \
    --old-policy-interval "$OLD_POLICY_INTERVAL" --eps-high "$EPS_HIGH" \
    --eval-interval "$EVAL_INTERVAL" --log-interval "$EVAL_INTERVAL" --metrics-file "$run/metrics.jsonl"
  RUN_ARGS+=(--run "$objective=$run")
done

"$PYTHON" "$ROOT/examples/toy_fidelity/summarise.py" "${RUN_ARGS[@]}" --in-domain B --out-of-domain A \
  --table "$OUT_DIR/table.md" --summary-json "$OUT_DIR/summary.json" --plot "$OUT_DIR/tradeoff.png"
# shellcheck disable=SC2086
"$PYTHON" -m megatron_psft.reports.plot $(for objective in $OBJECTIVES; do echo "$OUT_DIR/runs/$objective"; done) \
  -o "$OUT_DIR/curves.png"
echo "[toy_fidelity] wrote $OUT_DIR/table.md, $OUT_DIR/tradeoff.png and $OUT_DIR/curves.png"
