#!/usr/bin/env bash
# The DuoAttention report (issue 9): a transformer trained by `zoo train` on passkey documents
# (bench/passkey_corpus.py) so that it retrieves, converted by `zoo convert --duo` at several fractions of retrieval
# heads, and `zoo eval --tasks passkey,speed` of all of them: passkey accuracy and decode-cache bytes by context.
# Settings (environment): ZOO (default `zoo`), PYTHON (default python3), RUNS (default runs/duo-report), PRESET (gqa-tiny), SEQ_LEN (512),
# DOCUMENTS (4000), STEPS (300), BATCH (16), LR (1e-3), FRACTIONS ("0.25 0.5"), WINDOW (64), DUO_STEPS (100),
# EVAL_ARGS (extra `zoo eval` arguments). Defaults fit a 2-core CPU; bench/device_run.sh duo runs it larger.
set -euo pipefail
ZOO=${ZOO:-zoo}
RUNS=$(realpath -m "${RUNS:-runs/duo-report}")
SEQ_LEN=${SEQ_LEN:-512}
rm -rf "$RUNS" && mkdir -p "$RUNS"
${PYTHON:-python3} -P "$(dirname "$0")/passkey_corpus.py" --out "$RUNS/passkey.jsonl" --documents "${DOCUMENTS:-4000}" \
  --min-length $(( SEQ_LEN / 4 )) --max-length $(( SEQ_LEN - 1 ))
$ZOO train --preset "${PRESET:-gqa-tiny}" --data "$RUNS/passkey.jsonl" --seq-len "$SEQ_LEN" --steps "${STEPS:-300}" \
  --batch-size "${BATCH:-16}" --set model.vocab_size=320 --set optim.learning_rate="${LR:-1e-3}" --set eval_every=100 \
  --set checkpoint_every=100000 --set log_every=50 --out "$RUNS/teacher" 2>&1 | tr '\r' '\n' | grep -v "^training: " | tail -2
models=("$RUNS/teacher")
for fraction in ${FRACTIONS:-0.25 0.5}; do
  $ZOO convert "$RUNS/teacher" --out "$RUNS/duo-$fraction" --duo --duo-retrieval "$fraction" --duo-window "${WINDOW:-64}" \
    --duo-sinks 4 --duo-length "$SEQ_LEN" --duo-steps "${DUO_STEPS:-100}" 2>&1 | tr '\r' '\n' | grep -v "^duo gates: " | tail -2
  models+=("$RUNS/duo-$fraction")
done
$ZOO eval "${models[@]}" --tasks passkey,speed --passkey-lengths "$(( SEQ_LEN / 4 )),$(( SEQ_LEN / 2 )),$SEQ_LEN" \
  --speed-lengths "$(( SEQ_LEN / 4 )),$(( SEQ_LEN / 2 )),$SEQ_LEN" --out "$RUNS/eval" --overwrite ${EVAL_ARGS:-} 2>&1 \
  | tr '\r' '\n' | grep -v "batch/s\]$\|length/s\]$\|^WARNING"
