#!/usr/bin/env bash
# One call on the lent GPU: install the carried wheels (.whl: this repo's wheel and the few packages
# the device image lacks), then run what the arguments name, writing results under $OUT.
#   bench/device_run.sh bench      train-step throughput / MFU of zoo presets + the transformers peer
#   bench/device_run.sh train      `zoo train` of a hybrid preset on the embedded corpus (bf16 on GPU)
#   bench/device_run.sh kernels    the kernel tests compiled on the GPU, then bench/scan_kernels.py (fla peer)
#   bench/device_run.sh impl-train one hybrid preset trained with kernel_impl=xla and =pallas, curves compared
#   bench/device_run.sh attention  the attention kernel tests compiled on the GPU, bench/flash_attention.py (cuDNN,
#                                  torch SDPA peers), bench/attention_kernels.py (MLA and GQA decode), bench/decode_speed.py,
#                                  bench/device_trace.py (MLA decode and the copy ceiling in device time, with clocks);
#                                  PARTS="tests flash mla generate trace" picks a subset (default: the first four),
#                                  TESTS_K a pytest -k expression (TESTS_SECONDS their time limit), FLASH_ARGS / MLA_ARGS / TRACE_ARGS (e.g. --sweep) add
#                                  to or override those scripts' arguments
#   bench/device_run.sh distill    a gqa-125m teacher trained by `zoo train` on $DATA (default .whl/data/input.txt, the
#                                  carried Tiny Shakespeare), distilled by `zoo distill` into 50% Mamba-2 (AM), 75% Gated
#                                  DeltaNet + sliding-window attention (GGGS), 50% mLSTM (AX) and MLA;
#                                  bench/distill_table.py and bench/mla_conversion.py on the teacher -> $OUT
#   bench/device_run.sh eval-models bench/eval_students.sh models at gqa-125m (the distill teacher, its AM, AX and GGGS
#                                  students, in .device_runs/ for the next call on the warm machine), and beside it
#                                  bench/mqar_recipe.py (MQAR_ARGS, stopped after MQAR_SECONDS, default 480)
#   bench/device_run.sh eval       bench/eval_students.sh eval: `zoo eval` of those four -> $OUT/eval.tgz
#   bench/device_run.sh listops    bench/s4d_step.py (one S4D layer's step by chunk size, beside attention), then
#                                  bench/listops.py: the LRA ListOps splits drawn on every core, then S4D and the
#                                  transformer trained side by side (RUNS="model:lr ...", LISTOPS_SECONDS each) -> $OUT
#   bench/device_run.sh duo        bench/duo_report.sh at gqa-125m: a passkey-trained teacher, `zoo convert --duo` at 25/50%
#                                  retrieval heads, `zoo eval --tasks passkey,speed` -> $OUT/duo_eval.tgz
#   bench/device_run.sh incremental bench/incremental_distill.py on a teacher of $PRESET (trained first if absent) -> $OUT
#   bench/device_run.sh convert    the Hugging Face golden fixtures (tests/fixtures/hf, written to $OUT/fixtures) and
#                                  the live zoo-vs-transformers parity check (torch + transformers are on the image)
# .whl (git-ignored): `pip wheel --no-deps . -w .whl` and the packages the image lacks,
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 tensorboardX==2.6.5
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# The serial tells boards apart: the same model of GPU differs by a few percent from board to board.
nvidia-smi --query-gpu=name,serial,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
case "${1:-bench}" in
  bench)
    python3 bench/train_step.py --peer --presets "${PRESETS:-gqa-125m,gqa-350m,mamba2-hybrid-125m,mamba2-hybrid-350m,gdn-h1-125m}" \
      --batch "${BATCH:-16}" --seq-len "${SEQ_LEN:-2048}" --steps 10 --out "$OUT/train_step.jsonl" 2>&1 | tee "$OUT/bench.log" ;;
  train)
    # From /tmp: in the repository root the source folder zoo/ would shadow the installed package.
    (cd /tmp && python3 -m zoo.cli train --preset "${PRESET:-mamba2-hybrid-125m}" --steps "${STEPS:-300}" --batch-size 16 --seq-len 1024 \
      --set optim.learning_rate=1e-3 --set eval_every=100 --set checkpoint_every=150 --set log_every=25 \
      --out /tmp/run 2>&1) | tr '\r' '\n' | tee "$OUT/train.log" | grep -v "^training: "
    cp /tmp/run/metrics.jsonl /tmp/run/loss_curve.png "$OUT"/ ;;
  kernels)
    repo=$PWD
    # From /tmp (the installed zoo, not the source folder); JAX_PLATFORMS overrides the tests' CPU default
    # (cpu stays listed: the TPU kernel's interpreter runs its callbacks there).
    (cd /tmp && JAX_PLATFORMS=cuda,cpu python3 -m pytest -q -p no:cacheprovider -c "$repo/pyproject.toml" \
      "$repo/tests/test_scan_kernels.py" 2>&1) | tee "$OUT/kernel_tests.log" | tail -5
    python3 bench/scan_kernels.py --lengths "${LENGTHS:-2048,4096,8192}" --out "$OUT/scan_kernels.jsonl" 2>&1 \
      | tee "$OUT/scan_kernels.log" ;;
  attention)
    # One call has 10 minutes: all four parts with the MLA sweep took 7 on the H100.
    repo=$PWD
    parts=" ${PARTS:-tests flash mla generate} "
    # The tests are stopped after TESTS_SECONDS (default 420), so a kernel that hangs leaves the other parts their time.
    [[ $parts == *" tests "* ]] && (cd /tmp && JAX_PLATFORMS=cuda,cpu timeout "${TESTS_SECONDS:-420}" python3 -m pytest \
      -q -p no:cacheprovider -c "$repo/pyproject.toml" "$repo/tests/test_attention_kernels.py" ${TESTS_K:+-k "$TESTS_K"} 2>&1) \
      | tee "$OUT/attention_tests.log" | tail -5
    [[ $parts == *" flash "* ]] && python3 bench/flash_attention.py ${FLASH_ARGS:-} --out "$OUT/flash_attention.jsonl" 2>&1 \
      | tee "$OUT/flash_attention.log"
    [[ $parts == *" mla "* ]] && python3 bench/attention_kernels.py --batches 64,128 --contexts 8192,32768 ${MLA_ARGS:-} \
      --out "$OUT/attention_kernels.jsonl" 2>&1 | tee "$OUT/attention_kernels.log"
    [[ $parts == *" generate "* ]] && (cd /tmp && python3 "$repo/bench/decode_speed.py" --out "$OUT/decode_speed.jsonl" 2>&1) \
      | tee "$OUT/decode_speed.log"
    # An if, not [[ ]] &&: a part left out must not become the call's exit status.
    if [[ $parts == *" trace "* ]]; then JAX_PLATFORMS=cuda python3 bench/device_trace.py --batches 128,64 \
      --contexts 4096,8192,16384,32768 ${TRACE_ARGS:-} --out "$OUT/device_trace.jsonl" 2>&1 | tee "$OUT/device_trace.log"; fi ;;
  distill)
    repo=$PWD data=$PWD/${DATA:-.whl/data/input.txt}
    common="--data $data --seq-len 512"
    started=$(date +%s)
    (cd /tmp && python3 -m zoo.cli train --preset gqa-125m $common --steps "${TEACHER_STEPS:-150}" --batch-size 32 \
      --set model.vocab_size=320 --set optim.learning_rate=1e-3 --set eval_every=50 --set checkpoint_every=10000 \
      --set log_every=50 --out /tmp/teacher 2>&1) | tr '\r' '\n' | grep -v "^training: " | tee "$OUT/teacher.log" | tail -3
    echo "teacher: $(( $(date +%s) - started )) s" | tee "$OUT/times.txt"
    steps=${STAGE_STEPS:-50,50,300}
    declare -A students=([am]="--student-pattern AM" [gggs]="--student-pattern GGGS --window 128"
                         [mla]="--mla-rank 128 --rope-pairs 4" [ax]="--student-pattern AX"
                         [gggs_xla]="--student-pattern GGGS --window 128 --kernel-impl xla")
    # The students run side by side on the one GPU (125M models leave most of it idle), each stopped in time for
    # the call to bring its results back; each writes its summary and refreshes the table as it finishes.
    limit=$(( ${CALL_SECONDS:-570} - ($(date +%s) - started) - 30 ))
    for name in ${STUDENTS:-am gggs mla ax}; do
      (cd /tmp && XLA_PYTHON_CLIENT_MEM_FRACTION=0.18 timeout $limit python3 -m zoo.cli distill --teacher /tmp/teacher \
        ${students[$name]} --stages mixer,block,kl --stage-steps $steps $common --batch-size 16 --lr 1e-3 \
        --eval-every 10000 --checkpoint-every 10000 --log-every 50 --out /tmp/$name 2>&1 | tr '\r' '\n' > "/tmp/distill_$name.log";
       echo "$name: $(( $(date +%s) - started )) s" >> "$OUT/times.txt"; cp /tmp/$name/distill_summary.json "$OUT/$name.json" \
       && python3 "$repo/bench/distill_table.py" "$OUT"/*.json > "$OUT/distill_table.md") &
    done
    # The teacher's GQA -> MLA logit error by rank, on the rows it held out (the last 2% of the file).
    [[ ${MLA_SWEEP:-} != none ]] && (cd /tmp && XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 timeout $limit python3 "$repo/bench/mla_conversion.py" /tmp/teacher \
      --data $data --holdout 0.02 --seq-len 512 --windows 40 ${MLA_SWEEP:---ranks 0,256,128,64,32 --rope-pairs 4,8,16 --keep high} \
      --out "$OUT/mla_conversion.jsonl" > /tmp/mla_conversion.log 2>&1) &
    wait
    (cd /tmp && tar czf "$OUT/distill_logs.tgz" teacher/metrics.jsonl mla_conversion.log distill_*.log \
      */distill_summary.json */metrics.jsonl 2>/dev/null)
    cat "$OUT/times.txt" "$OUT/distill_table.md" ;;
  eval-models|eval)
    # bench/eval_students.sh at the distill table's settings; the runs stay in .device_runs/ (git-ignored, so kept
    # on the warm machine) for the `eval` call that follows. eval-models also runs bench/mqar_recipe.py beside.
    [[ $1 == eval-models ]] && (XLA_PYTHON_CLIENT_MEM_FRACTION=0.15 timeout ${MQAR_SECONDS:-480} python3 -P bench/mqar_recipe.py \
      ${MQAR_ARGS:-} --out "$OUT/mqar_recipe.jsonl" > "$OUT/mqar_recipe.log" 2>&1) &
    phase=$([[ $1 == eval-models ]] && echo models || echo eval)
    ZOO="python3 -P -m zoo.cli" DATA=${DATA:-.whl/data/input.txt} RUNS=.device_runs PRESET=gqa-125m VOCAB=320 SEQ_LEN=512 \
      TEACHER_STEPS=150 TEACHER_BATCH=32 STAGE_STEPS=${STAGE_STEPS:-50,50,300} STUDENT_BATCH=16 PARALLEL=1 \
      MEMORY_FRACTION=0.18 EVAL_ARGS="--batch-size 16 --passkey-lengths 512,1024,2048,4096 --speed-batch 8
      --speed-lengths ${SPEED_LENGTHS:-512,2048,4000}" bash bench/eval_students.sh $phase | tee "$OUT/$phase.log"
    wait
    [[ $phase == eval ]] && tar czf "$OUT/eval.tgz" -C .device_runs eval ;;
  convert)
    repo=$PWD
    # One archive: a call brings back only a few files.
    (cd /tmp && python3 "$repo/tests/fixtures/hf/make_fixtures.py" --out /tmp/fixtures 2>&1) | tee "$OUT/fixtures.log"
    tar czf "$OUT/hf_fixtures.tgz" -C /tmp/fixtures .
    (cd /tmp && python3 "$repo/tests/fixtures/hf/make_fixtures.py" --live "$OUT" 2>&1) | tee "$OUT/hf_parity.log" ;;
  listops)
    python3 -P bench/s4d_step.py ${S4D_STEP_ARGS:---chunks 16,64} --out "$OUT/s4d_step.jsonl" 2>&1 | tail -12
    python3 -P bench/listops.py --data /tmp/listops.npz --draw-only 2>&1 | tr '\r' '\n' | grep -v "row/s]$" | tail -3
    for run in ${RUNS:-s4d:1e-2 s4d:3e-3 transformer:1e-3 transformer:3e-4}; do
      (XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 python3 -P bench/listops.py --data /tmp/listops.npz --model ${run%%:*} \
        --lr ${run##*:} --seconds ${LISTOPS_SECONDS:-300} --every 500 --out "$OUT/listops.jsonl" \
        > "$OUT/listops_${run/:/_}.log" 2>&1) &
    done
    wait
    grep final "$OUT/listops.jsonl" ;;
  duo)
    ZOO="python3 -P -m zoo.cli" RUNS=.device_runs/duo PRESET=gqa-125m SEQ_LEN=${SEQ_LEN:-1024} DOCUMENTS=${DOCUMENTS:-30000} \
      STEPS=${STEPS:-3000} BATCH=16 FRACTIONS="${FRACTIONS:-0.25 0.5}" WINDOW=${WINDOW:-128} DUO_STEPS=${DUO_STEPS:-150} \
      EVAL_ARGS="--batch-size 8 --speed-batch 8" bash bench/duo_report.sh | tee "$OUT/duo.log"
    (cd .device_runs/duo && tar czf "$OUT/duo_eval.tgz" eval teacher/metrics.jsonl duo-*/duo_heads.json) ;;
  incremental)
    # PRESET (default gqa-125m), TEACHER_STEPS (150), SEQ_LEN (512), STAGE_STEPS (25,25,50 a round), PER_ROUND (2),
    # TARGET_RATIO (0.5); the teacher is reused from .device_runs/teacher-$PRESET when there.
    data=$PWD/${DATA:-.whl/data/input.txt} preset=${PRESET:-gqa-125m} seq=${SEQ_LEN:-512}
    teacher=.device_runs/teacher-$preset
    [[ -d $teacher ]] || python3 -P -m zoo.cli train --preset $preset --data "$data" --seq-len $seq \
      --steps ${TEACHER_STEPS:-150} --batch-size 32 --set model.vocab_size=320 --set optim.learning_rate=1e-3 --set eval_every=50 \
      --set checkpoint_every=100000 --set log_every=50 --out $teacher 2>&1 | tr '\r' '\n' | grep -v "^training: " | tail -2
    rm -rf .device_runs/incremental
    python3 -P bench/incremental_distill.py --teacher $teacher --data "$data" --seq-len $seq \
      --stage-steps ${STAGE_STEPS:-25,25,50} --per-round ${PER_ROUND:-2} --target-ratio ${TARGET_RATIO:-0.5} \
      --out .device_runs/incremental 2>&1 | tr '\r' '\n' | grep -v "^distilling: \|it/s\]$" | tee "$OUT/incremental.log" | tail -12
    cp .device_runs/incremental/incremental_vs_oneshot.* .device_runs/incremental/incremental/incremental.json "$OUT"/ ;;
  impl-train)
    for impl in xla pallas; do
      (cd /tmp && python3 -m zoo.cli train --preset "${PRESET:-mamba2-hybrid-125m}" --steps "${STEPS:-100}" --batch-size 16 \
        --seq-len 1024 --set optim.learning_rate=1e-3 --set eval_every=50 --set checkpoint_every=1000 --set log_every=1 \
        --set kernel_impl=$impl --out /tmp/run_$impl 2>&1) | tr '\r' '\n' | grep -v "^training: " | tail -4
      cp /tmp/run_$impl/metrics.jsonl "$OUT/metrics_$impl.jsonl"
    done
    python3 bench/compare_loss_curves.py "$OUT/metrics_xla.jsonl" "$OUT/metrics_pallas.jsonl" --out "$OUT/compare.json" | tail -3 ;;
esac
