#!/usr/bin/env bash
# A teacher trained by `zoo train`, distilled by `zoo distill` into 50% Mamba-2 (AM), 50% mLSTM (AX) and 75% Gated
# DeltaNet + sliding-window attention (GGGS) students, then `zoo eval` of all four: perplexity on the tail of the
# text that `zoo train` held out, MQAR, passkey and generation speed (with the side-by-side plot).
#   bench/eval_students.sh models   train and distill into $RUNS
#   bench/eval_students.sh eval     evaluate $RUNS/{teacher,am,ax,gggs} into $RUNS/eval
#   bench/eval_students.sh all      both
# Defaults fit a 2-core CPU (gqa-tiny, minutes); bench/device_run.sh runs it with gqa-125m on the GPU.
# Settings (environment): ZOO (the command, default `zoo`), DATA (default ../shared/data/tinyshakespeare/input.txt),
# RUNS, PRESET, VOCAB, SEQ_LEN, TEACHER_STEPS, TEACHER_BATCH, STAGE_STEPS, STUDENT_BATCH, LR, EVAL_ARGS,
# PARALLEL=1 (distill the students side by side), MEMORY_FRACTION (per student, for GPUs).
set -euo pipefail
ZOO=${ZOO:-zoo}
DATA=$(realpath "${DATA:-../shared/data/tinyshakespeare/input.txt}")
RUNS=$(realpath -m "${RUNS:-runs/eval-students}")
PRESET=${PRESET:-gqa-tiny} SEQ_LEN=${SEQ_LEN:-128} LR=${LR:-1e-3}
common="--data $DATA --seq-len $SEQ_LEN"

models() {
  rm -rf "$RUNS" && mkdir -p "$RUNS"
  $ZOO train --preset "$PRESET" $common --steps "${TEACHER_STEPS:-300}" --batch-size "${TEACHER_BATCH:-16}" \
    ${VOCAB:+--set model.vocab_size=$VOCAB} --set optim.learning_rate="$LR" --set eval_every=100 \
    --set checkpoint_every=100000 --set log_every=100 --out "$RUNS/teacher" 2>&1 | tr '\r' '\n' | grep -v "^training: " | tail -2
  declare -A students=([am]="--student-pattern AM" [ax]="--student-pattern AX" [gggs]="--student-pattern GGGS --window 64")
  for name in am ax gggs; do
    distill() {
      ${MEMORY_FRACTION:+env XLA_PYTHON_CLIENT_MEM_FRACTION=$MEMORY_FRACTION} $ZOO distill --teacher "$RUNS/teacher" \
        ${students[$name]} --stages mixer,block,kl --stage-steps "${STAGE_STEPS:-50,50,150}" $common \
        --batch-size "${STUDENT_BATCH:-16}" --lr "$LR" --eval-every 100000 --checkpoint-every 100000 --log-every 50 \
        --out "$RUNS/$name" 2>&1 | tr '\r' '\n' | grep -v "^distilling: " | tail -2
    }
    if [[ ${PARALLEL:-0} == 1 ]]; then distill & else distill; fi
  done
  wait
}

evaluate() {
  # the last 1/60 of the text lies inside the rows `zoo train` held out (the last 2% of its packed rows)
  tail -c $(( $(wc -c < "$DATA") / 60 )) "$DATA" > "$RUNS/heldout.txt"
  $ZOO eval "$RUNS/teacher" "$RUNS/am" "$RUNS/ax" "$RUNS/gggs" --tasks ppl,mqar,passkey,speed \
    --data "$RUNS/heldout.txt" --context "$SEQ_LEN" --stride $(( SEQ_LEN / 2 )) --out "$RUNS/eval" --overwrite \
    ${EVAL_ARGS:-} 2>&1 | tr '\r' '\n' | grep -v "it/s\]$\|batch/s\]$\|length/s\]$\|^WARNING"
}

case "${1:-all}" in
  models) models ;;
  eval) evaluate ;;
  all) models; evaluate ;;
  *) echo "usage: $0 models|eval|all" >&2; exit 2 ;;
esac
