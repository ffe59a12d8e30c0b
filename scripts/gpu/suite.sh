#!/usr/bin/env bash
# The GPU runs, on the GPU machine from the repository root, with the carry folder made by
# scripts/gpu/pack.sh (CARRY/bin/sparse-train, CARRY/tests/*, optional CARRY/corpus.tar.xz from
# corpus/pack_for_device.sh and CARRY/torch_anchor.py). Logs and run folders go to $OUT.
#
#   bash scripts/gpu/suite.sh NAME [CARRY]      (CARRY defaults to .carry)
#
#   tests         every carried kernel test binary under each kernel image (IMAGES, default
#                 "auto compute_80 nvrtc"; auto is the sm_90a cubin on Hopper), with
#                 SPARSE_TRAIN_REQUIRE_GPU=1; exits non-zero if any test fails
#   benches       FFN and end-to-end benches at 1.5b, the dense trainer's MFU at 1.5b, the
#                 trainer under `mpirun -n 1` (NCCL)
#   decode        bench generate (the captured decoder, dense and TwELL, GEN_BATCH, default
#                 1,32) and torch_anchor.py's eager and CUDA-graph decode, in one job, per
#                 shape of SHAPES (default 1.5b)
#   study         the sparsity study: 125m-dense and 125m on the real corpus (docs/study)
#   sweep         the lambda sweep at 125m on the real corpus (ARMS, STEPS, BENCH_ARMS: see
#                 case_sweep), each arm's metrics as $OUT/sweep-LAMBDA.tar.gz
#   hybrid-train  125m with the lambda ramp, every FFN dense vs the auto path (STEPS, 300)
#   generate      125m trained on the real corpus (STEPS, 300), then `generate` from its
#                 checkpoint, dense vs TwELL, batch 1 and 32
#   sizes         gains against model size: the training step and the forward at 0.5b, 1b,
#                 1.5b, 2b (SHAPES), each beside the anchor's compiled one (docs/study/sizes.py)
#   microbatch    the training step at micro-batches of MICROS sequences (16 a step), ours and
#                 the anchor's compiled one, per shape of SHAPES (default 1.5b)
#   anchors       CARRY/torch_anchor.py: PyTorch eager and torch.compile at 1.5b
#   ab            CARRY/bin/sparse-train-before against CARRY/bin/sparse-train, dense 1.5b
#   curve         the same two binaries on the 125m corpus run at lambda 0 (CURVE_S seconds
#                 each): training CE side by side at every log step
#   train-step    the training step against PyTorch's best, in one job, per shape of SHAPES
#                 (default 1.5b): `bench train` (dense and hybrid at 99.5 % imposed sparsity,
#                 the anchor's micro-batches, the trainer's step) and torch_anchor.py's eager
#                 and compile steps
#   graphs        train.cuda_graph: the trainer's GPU test (captured micro-batches train as
#                 eager ones), then per shape of SHAPES (default "1.5b 125m") `bench train`
#                 eager and captured, beside torch_anchor.py's compiled step
#   profile       a Chrome trace of one dense 1.5b training step and where its time goes
#                 (scripts/profile_summary.py), then the anchor's 1.5b training step
#                 (PROFILE_ANCHOR=0: without it)
#   bwd-w         the hybrid FFN's fwd+bwd at 99.5 % (bench ffn --mode train, N = 16384, 8192,
#                 4096) with the embedded kernels, then with hybrid.cu rebuilt here at other
#                 weight-gradient settings (VARIANTS, default "UNR=4": comma-separated lists
#                 of the HYB_BWD_W_* defines) through SPARSE_TRAIN_CUBINS, at N = TOKENS (8192)
#   corpus        only unpack and tokenize CARRY/corpus.tar.xz into data/corpus/shards
# Every case but `tests` prints what it measures and exits non-zero if a command failed.
set -uo pipefail
NAME=${1:?usage: suite.sh tests|bwd-w|graphs|benches|decode|study|sweep|hybrid-train|generate|anchors|profile|train-step|sizes|microbatch|curve|ab|corpus [CARRY]}
CARRY=${2:-.carry}
source scripts/gpu/env.sh
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
failed=0

# Runs sparse-train ARGS, shows its last lines without libtorch's autocast warnings, and
# records a failure of the binary itself (not of the filters).
run() {
  echo "+ sparse-train $*"
  "$BIN" "$@" 2>&1 | grep -v "Warning: at::autocast" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
}

# `run` with the whole output also in $OUT/LOG: run_logged LOG ARGS (a `run ... | tee` would
# set `failed` in a subshell, where it is lost).
run_logged() {
  local log=$1
  shift
  echo "+ sparse-train $*"
  "$BIN" "$@" 2>&1 | grep -v "Warning: at::autocast" | tee "$OUT/$log" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
}

# Runs sparse-train ARGS with its whole output in $OUT/LOG, showing the model and step lines.
# The dense trainer at the 1.5b shape on random tokens, 16 x 2048 tokens a step (the
# anchor's batch): the runs of benches, profile and ab.
# The lambda sweep's 125m run on the real corpus (docs/study): the whole BBC set every 256
# steps, a log line every 32, one checkpoint at the end: the runs of sweep and curve.
SWEEP_125M=(--config configs/125m.yaml --quiet --set train.eval_every=256
  --set train.eval_batches=100000 --set train.log_every=32 --set checkpoint.every=0
  --set checkpoint.keep_last=1)
DENSE_1P5B=(--config configs/1.5b.yaml --quiet --synthetic-data --set train.batch_size=16
  --set sparsity.ffn_path=dense)

train_logged() {
  local log=$1
  shift
  echo "+ sparse-train $*"
  "$BIN" "$@" 2>&1 | tee "$OUT/$log" | grep -E "^(model|step)|rror|panick"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
}

gpu_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}

# Unpacks CARRY/corpus.tar.xz and tokenizes it with the carried binary (prose twice, as
# `corpus build` does) into data/corpus/shards/{train,val}.
prepare_corpus() {
  mkdir -p data/corpus && tar -xJf "$CARRY/corpus.tar.xz" -C data/corpus || return 1
  local train
  mapfile -t train < <(python3 -c "
import json; m = json.load(open('data/corpus/manifest.json'))
print('\n'.join(m['train_files'] + m['prose_files']))")
  "$BIN" prepare --input "${train[@]/#/data/corpus/}" --out data/corpus/shards/train | tail -1 &&
    "$BIN" prepare --input data/corpus/val/bbc.jsonl --out data/corpus/shards/val | tail -1
}

case_tests() {
  gpu_info
  local img t failures=()
  shopt -s nullglob
  local tests=("$CARRY"/tests/*)
  [ ${#tests[@]} -gt 0 ] || { echo "no test binaries in $CARRY/tests: run scripts/gpu/pack.sh"; return 1; }
  for img in ${IMAGES:-auto compute_80 nvrtc}; do
    echo "=== SPARSE_TRAIN_KERNEL_IMAGE=$img"
    for t in "${tests[@]}"; do
      echo "+ $(basename "$t")"
      # The test binaries link libtorch_cuda only as needed; preloading it makes CUDA visible.
      SPARSE_TRAIN_KERNEL_IMAGE=$img SPARSE_TRAIN_REQUIRE_GPU=1 LD_PRELOAD="$TL/libtorch_cuda.so" \
        "$t" --test-threads 1 2>&1 | grep -E "^test |test result|panicked"
      [ "${PIPESTATUS[0]}" -eq 0 ] || failures+=("$img/$(basename "$t")")
    done
  done
  if [ ${#failures[@]} -gt 0 ]; then
    echo "FAILED: ${failures[*]}"
    return 1
  fi
  echo "all kernel tests passed under every image"
}

case_benches() {
  run bench ffn --shape 1.5b --tokens 16384,4096 --sparsity 0.995 --mode infer
  run bench ffn --shape 1.5b --tokens 16384,4096 --sparsity 0.995 --mode train
  run bench ffn --shape 1.5b --tokens 16384 --sparsity 0.99 --mode train
  run bench infer --config configs/1.5b.yaml --steps 5 --warmup 2
  run bench train --config configs/1.5b.yaml --steps 8 --warmup 2
  gpu_info
  train_logged 1.5b.log "${DENSE_1P5B[@]}" --max-steps 16 --set train.log_every=4 \
    --out-dir "$OUT/run-1.5b"
  echo "+ mpirun -n 1 sparse-train (NCCL)"
  mpirun --allow-run-as-root -n 1 -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE "$BIN" \
    --config configs/125m.yaml --quiet --synthetic-data --max-steps 20 --set train.log_every=10 \
    --set checkpoint.every=0 --out-dir "$OUT/run-mpi1" 2>&1 | tee "$OUT/mpi1.log" |
    grep -E "^(model|step)|rror|rank"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
}

case_decode() {
  gpu_info
  [ -f "$CARRY/torch_anchor.py" ] || { echo "no $CARRY/torch_anchor.py"; failed=1; return; }
  local shape
  for shape in ${SHAPES:-1.5b}; do
    run bench generate --config "configs/$shape.yaml" --gen-batch "${GEN_BATCH:-1,32}" \
      --warmup 1 --steps "${STEPS:-5}"
    echo "+ torch_anchor.py decode --shape $shape --batch ${GEN_BATCH:-1,32}"
    python3 "$CARRY/torch_anchor.py" decode --shape "$shape" --batch "${GEN_BATCH:-1,32}" |
      tee "$OUT/anchor-decode-$shape.jsonl" || failed=1
  done
}

case_study() {
  gpu_info
  prepare_corpus || return 1
  local cfg
  for cfg in 125m-dense 125m; do
    train_logged "$cfg.log" --config "configs/$cfg.yaml" --quiet --set sparsity.ffn_path=dense \
      --out-dir "$OUT/$cfg"
    rm -rf "${OUT:?}/$cfg/checkpoints"
  done
}

# The lambda sweep of docs/study: configs/125m.yaml on the real corpus, one arm per lambda of
# ARMS (in order), each STEPS optimizer steps of 64 x 1024 tokens (default 1526: 100.0 M
# tokens), evaluated on the whole BBC set every 256 steps and at the end. An arm starts only
# when it is expected to end JOB_LIMIT_S seconds (default 570) into the job at the latest:
# expected to take as long as the arm before it (ARM_EST_S, default 280, for the first).
# Each arm's metrics, TensorBoard events and log come back as $OUT/sweep-LAMBDA.tar.gz.
# An arm LAMBDA:reinit also redraws dead units (sparsity.reinit_dead), named LAMBDA-reinit;
# LAMBDA:edges=K weighs the first and last layers' L1 K times, named LAMBDA-edgesK.
# Then, for each arm of BENCH_ARMS while time is left (BENCH_EST_S, default 70, each):
# bench infer / train / generate on its checkpoint (its learned sparsity, inputs from the
# validation shards); lambda 0's on the dense path alone.
case_sweep() {
  gpu_info
  local t0=$SECONDS lam dir start took=${ARM_EST_S:-280} limit=${JOB_LIMIT_S:-570} paths
  prepare_corpus || return 1
  echo "corpus ready after $((SECONDS - t0)) s"
  local arm extra
  for arm in ${ARMS:?ARMS=lambda values}; do
    if ((SECONDS - t0 + took > limit)); then
      echo "arm $arm not started: $((SECONDS - t0)) s into the job, an arm takes ~$took s"
      failed=1
      continue
    fi
    # LAMBDA:reinit redraws dead units' gate rows (sparsity.reinit_dead), arm LAMBDA-reinit;
    # LAMBDA:edges=K weighs the L1 of the first and last of the 12 layers K times
    # (sparsity.l1_layer_weights), arm LAMBDA-edgesK.
    lam=${arm%%:*}
    extra=()
    case ${arm#"$lam"} in
      "") ;;
      :reinit)
        extra=(--set sparsity.reinit_dead=true)
        lam=$lam-reinit
        ;;
      :edges=*)
        local k=${arm#*:edges=}
        extra=(--set "sparsity.l1_layer_weights=[$k, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, $k]")
        lam=$lam-edges$k
        ;;
      *)
        echo "arm $arm: LAMBDA, LAMBDA:reinit or LAMBDA:edges=K"
        failed=1
        continue
        ;;
    esac
    dir=/tmp/sweep/$lam
    rm -rf "$dir"
    start=$SECONDS
    train_logged "sweep-$lam.log" "${SWEEP_125M[@]}" --max-steps "${STEPS:-1526}" \
      --set sparsity.l1_coeff="${arm%%:*}" "${extra[@]}" --out-dir "$dir"
    took=$((SECONDS - start))
    cp "$OUT/sweep-$lam.log" "$dir/train.log"
    tar -C "$dir" --exclude=checkpoints -czf "$OUT/sweep-$lam.tar.gz" .
    echo "arm $lam done in $took s, $((SECONDS - t0)) s into the job"
  done
  for lam in ${BENCH_ARMS:-}; do
    dir=/tmp/sweep/$lam
    if ((SECONDS - t0 + ${BENCH_EST_S:-70} > limit)) || [ ! -d "$dir/checkpoints" ]; then
      echo "bench of arm $lam not started ($((SECONDS - t0)) s into the job)"
      continue
    fi
    paths=()
    [ "$lam" = 0 ] && paths=(--paths dense)
    {
      run bench infer --checkpoint "$dir" --steps 5 --warmup 2 "${paths[@]}"
      run bench train --checkpoint "$dir" --steps 4 --warmup 1 --batch 32 --accum 2 "${paths[@]}"
      run bench generate --checkpoint "$dir" --steps 3 --warmup 1 --gen-batch 1,32 "${paths[@]}"
    } 2>&1 | tee -a "$OUT/sweep-bench.log"
  done
}

case_hybrid_train() {
  prepare_corpus || return 1
  local path
  for path in dense auto; do
    train_logged "$path.log" --config configs/125m.yaml --quiet --max-steps "${STEPS:-300}" \
      --set sparsity.l1_end_step=150 --set train.eval_every=100 --set checkpoint.every=0 \
      --set sparsity.switch_period=25 --set sparsity.ffn_path=$path --set sparsity.l0_cutoff=200 \
      --out-dir "$OUT/$path"
    rm -rf "${OUT:?}/$path/checkpoints"
  done
}

case_generate() {
  prepare_corpus || return 1
  train_logged train.log --config configs/125m.yaml --quiet --max-steps "${STEPS:-300}" \
    --set train.eval_every=100 --out-dir "$OUT/125m"
  local b p
  for b in 1 32; do
    for p in dense twell; do
      run generate --checkpoint "$OUT/125m" --prompt "The history of the city begins" \
        --max-tokens 200 --ignore-eos --batch $b --ffn-path $p --warmup 1
    done
  done
  rm -rf "${OUT:?}/125m/checkpoints"
}

# A Chrome trace of one 1.5b training step (dense FFN, 16 x 2048 tokens) and where its time
# goes (scripts/profile_summary.py), beside the PyTorch anchor's step in the same job.
case_profile() {
  gpu_info
  local run=/tmp/run-profile
  rm -rf "$run"
  train_logged profile-1.5b.log "${DENSE_1P5B[@]}" --max-steps 6 --set train.log_every=1 \
    --profile-steps 5..5 --out-dir "$run"
  python3 scripts/profile_summary.py "$run/trace.json" --top 25 | tee "$OUT/profile-1.5b.txt"
  gzip -c "$run/trace.json" > "$OUT/trace-1.5b.json.gz"
  rm -rf "$run"
  if [ -f "$CARRY/torch_anchor.py" ] && [ "${PROFILE_ANCHOR:-1}" = 1 ]; then
    echo "+ torch_anchor.py train --shape 1.5b"
    python3 "$CARRY/torch_anchor.py" train --shape 1.5b | tee "$OUT/anchor-train-1.5b.jsonl" || failed=1
  fi
}

# Two binaries in one job, the dense 1.5b step (8 steps each): CARRY/bin/sparse-train-before
# (an earlier build, copied there by hand) and CARRY/bin/sparse-train.
case_ab() {
  gpu_info
  local b
  for b in sparse-train-before sparse-train; do
    [ -x "$CARRY/bin/$b" ] || { echo "no $CARRY/bin/$b"; failed=1; continue; }
    echo "=== $b"
    rm -rf "/tmp/run-$b"
    "$CARRY/bin/$b" "${DENSE_1P5B[@]}" --max-steps 8 --set train.log_every=1 \
      --out-dir "/tmp/run-$b" 2>&1 | grep -v autocast | tee "$OUT/$b.log" | grep -E "^step|rror"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
    rm -rf "/tmp/run-$b"
  done
}

case_train_step() {
  gpu_info
  [ -f "$CARRY/torch_anchor.py" ] || { echo "no $CARRY/torch_anchor.py"; failed=1; return; }
  local shape micro accum
  for shape in ${SHAPES:-1.5b}; do
    # The anchor's step: 4 micro-batches of 4 sequences (2 of 32 at 125m).
    micro=4 accum=4
    [ "$shape" = 125m ] && micro=32 accum=2
    run bench train --config "configs/$shape.yaml" --steps "${STEPS:-4}" --warmup 1 \
      --batch "$micro" --accum "$accum"
    echo "+ torch_anchor.py train --shape $shape"
    python3 "$CARRY/torch_anchor.py" train --shape "$shape" | tee "$OUT/anchor-train-$shape.jsonl" || failed=1
  done
}

# Captured micro-batches (train.cuda_graph). Logs: $OUT/graph-test.log,
# $OUT/graphs-SHAPE-{eager,captured}.log, $OUT/anchor-train-SHAPE.jsonl.
case_graphs() {
  gpu_info
  [ -f "$CARRY/torch_anchor.py" ] || { echo "no $CARRY/torch_anchor.py"; failed=1; return; }
  echo "+ cuda_graph_train"
  SPARSE_TRAIN_REQUIRE_GPU=1 LD_PRELOAD="$TL/libtorch_cuda.so" "$CARRY/tests/cuda_graph_train" \
    --test-threads 1 --nocapture 2>&1 | tee "$OUT/graph-test.log" | grep -E "^step|^test |test result|panicked|rror" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
  local shape micro accum
  for shape in ${SHAPES:-1.5b 125m}; do
    micro=4 accum=4
    [ "$shape" = 125m ] && micro=32 accum=2
    run_logged "graphs-$shape-eager.log" bench train --config "configs/$shape.yaml" --steps "${STEPS:-4}" --warmup 1 \
      --batch "$micro" --accum "$accum"
    run_logged "graphs-$shape-captured.log" bench train --config "configs/$shape.yaml" --steps "${STEPS:-4}" --warmup 1 \
      --batch "$micro" --accum "$accum" --set train.cuda_graph=true
    echo "+ torch_anchor.py train --shape $shape --modes compile"
    python3 "$CARRY/torch_anchor.py" train --shape "$shape" --modes compile |
      tee "$OUT/anchor-train-$shape.jsonl" || failed=1
  done
}

# The weight-gradient kernel's settings (see the header above; a variant is a comma-separated
# list of NAME=VALUE for the HYB_BWD_W_NAME defines). Logs: $OUT/bwd-w-*.log.
case_bwd_w() {
  gpu_info
  run_logged "bwd-w-embedded.log" bench ffn --shape 1.5b --tokens 16384,8192,4096 --sparsity 0.995 --mode train
  local v dir defs tag
  for v in ${VARIANTS:-UNR=4}; do
    tag=$(echo "$v" | tr '=,' '-_')
    dir=/tmp/cubins-$tag
    defs=$(echo "$v" | tr ',' '\n' | sed 's/^/-DHYB_BWD_W_/')
    mkdir -p "$dir"
    # shellcheck disable=SC2086
    nvcc -cubin -O3 -std=c++17 -lineinfo -gencode=arch=compute_90a,code=sm_90a $defs \
      -I kernels/cuda -o "$dir/hybrid.sm_90a.cubin" kernels/cuda/hybrid.cu || { failed=1; continue; }
    echo "=== $v"
    SPARSE_TRAIN_CUBINS=$dir run_logged "bwd-w-$tag.log" bench ffn --shape 1.5b --tokens ${TOKENS:-8192} --sparsity 0.995 \
      --mode train
  done
}

# Gains against model size (docs/study/sizes.py): per shape of SHAPES (default
# "0.5b 1b 1.5b 2b"; about 3 minutes a shape, so two jobs), the training step (dense, and hybrid
# at 99.5 % imposed sparsity; the anchor's 4 x 4 x 2048) and the forward (dense and TwELL,
# 64 x 2048), each beside torch_anchor.py's compiled step and forward at the same shape; 2b at
# the anchor's 36 layers. Logs: $OUT/sizes-{train,infer}-SHAPE.log, $OUT/anchor-{train,infer}-SHAPE.jsonl.
case_sizes() {
  gpu_info
  [ -f "$CARRY/torch_anchor.py" ] || { echo "no $CARRY/torch_anchor.py"; failed=1; return; }
  local shape extra
  for shape in ${SHAPES:-0.5b 1b 1.5b 2b}; do
    extra=()
    [ "$shape" = 2b ] && extra=(--set model.num_layers=36)
    run_logged "sizes-train-$shape.log" bench train --config "configs/$shape.yaml" "${extra[@]}" --steps 4 --warmup 1 --batch 4 \
      --accum 4
    echo "+ torch_anchor.py train --shape $shape --modes compile"
    python3 "$CARRY/torch_anchor.py" train --shape "$shape" --modes compile |
      tee "$OUT/anchor-train-$shape.jsonl" || failed=1
    run_logged "sizes-infer-$shape.log" bench infer --config "configs/$shape.yaml" "${extra[@]}" --steps 5 --warmup 2
    echo "+ torch_anchor.py infer --shape $shape --modes compile"
    python3 "$CARRY/torch_anchor.py" infer --shape "$shape" --modes compile |
      tee "$OUT/anchor-infer-$shape.jsonl" || failed=1
  done
}

# The micro-batch that maximises tokens/s: per shape of SHAPES (default 1.5b) and micro-batch
# of MICROS (sequences, default "2 4 8 16"), the same 16 sequences a step as accumulation, our
# training step (dense and hybrid at 99.5 % imposed) beside the anchor's compiled step at the
# same micro-batch. Logs: $OUT/micro-SHAPE-M.log, $OUT/anchor-micro-SHAPE-M.jsonl.
case_microbatch() {
  gpu_info
  [ -f "$CARRY/torch_anchor.py" ] || { echo "no $CARRY/torch_anchor.py"; failed=1; return; }
  local shape m
  for shape in ${SHAPES:-1.5b}; do
    for m in ${MICROS:-2 4 8 16}; do
      run_logged "micro-$shape-$m.log" bench train --config "configs/$shape.yaml" --steps 4 --warmup 1 --batch "$m" \
        --accum $((16 / m))
      echo "+ torch_anchor.py train --shape $shape --modes compile --micro $m --accum $((16 / m))"
      python3 "$CARRY/torch_anchor.py" train --shape "$shape" --modes compile --micro "$m" \
        --accum $((16 / m)) | tee "$OUT/anchor-micro-$shape-$m.jsonl" || failed=1
    done
  done
}

# Same losses from two binaries: CARRY/bin/sparse-train-before and CARRY/bin/sparse-train each
# train configs/125m.yaml at lambda 0 on the real corpus with the sweep's schedule (1526 steps,
# so the same learning-rate curve), stopped by SIGINT after CURVE_S seconds (default 60);
# then the training CE of both at every common log step and the validation CE at step 256.
case_curve() {
  gpu_info
  prepare_corpus || return 1
  local b
  for b in sparse-train-before sparse-train; do
    [ -x "$CARRY/bin/$b" ] || { echo "no $CARRY/bin/$b"; failed=1; return; }
    rm -rf "/tmp/curve-$b"
    timeout -s INT "${CURVE_S:-60}" "$CARRY/bin/$b" "${SWEEP_125M[@]}" --max-steps 1526 \
      --set sparsity.l1_coeff=0 --out-dir "/tmp/curve-$b" 2>&1 | grep -v autocast >"$OUT/curve-$b.log"
    cp "/tmp/curve-$b/metrics.jsonl" "$OUT/curve-$b.jsonl" || failed=1
  done
  python3 - "$OUT/curve-sparse-train-before.jsonl" "$OUT/curve-sparse-train.jsonl" <<'PY'
import json, sys
def logs(p):
    return {d["log_step"]: d for d in map(json.loads, open(p)) if "log_step" in d}
a, b = logs(sys.argv[1]), logs(sys.argv[2])
for s in sorted(set(a) & set(b)):
    va, vb = a[s].get("val_ce"), b[s].get("val_ce")
    val = f" | val {va:.4f} {vb:.4f}" if va is not None and vb is not None else ""
    print(f"step {s:5d} ce {a[s]['ce']:.4f} {b[s]['ce']:.4f} diff {b[s]['ce'] - a[s]['ce']:+.4f}"
          f" | tok/s {a[s]['tokens_per_s']:.0f} {b[s]['tokens_per_s']:.0f}{val}")
PY
}

case_anchors() {
  [ -f "$CARRY/torch_anchor.py" ] || { echo "no $CARRY/torch_anchor.py"; return 1; }
  local mode
  for mode in train infer decode; do
    echo "+ torch_anchor.py $mode --shape 1.5b"
    python3 "$CARRY/torch_anchor.py" "$mode" --shape 1.5b || failed=1
  done
}

case $NAME in
  tests) case_tests ;;
  benches) case_benches ;;
  decode) case_decode ;;
  study) case_study ;;
  sweep) case_sweep ;;
  hybrid-train) case_hybrid_train ;;
  generate) case_generate ;;
  anchors) case_anchors ;;
  profile) case_profile ;;
  train-step) case_train_step ;;
  graphs) case_graphs ;;
  sizes) case_sizes ;;
  microbatch) case_microbatch ;;
  curve) case_curve ;;
  ab) case_ab ;;
  bwd-w) case_bwd_w ;;
  corpus) prepare_corpus ;;
  *)
    echo "unknown suite $NAME: tests, bwd-w, graphs, benches, decode, study, sweep, hybrid-train, generate, anchors, profile, train-step, sizes, microbatch, curve, ab, corpus" >&2
    exit 2
    ;;
esac
rc=$?
[ $rc -eq 0 ] && [ $failed -eq 0 ]
