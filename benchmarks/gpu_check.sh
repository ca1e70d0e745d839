#!/usr/bin/env bash
# The GPU measurement kit (issue 21) for a lent H100/H200 (device tool): benchmarks as JSON, the `gpu` tests,
# one classifier stage profiled, and the quick CMNIST pipeline; everything lands in $OUT.
#
# Expects wheels for what the device may lack in .whl/ (carried along; only distributions the device does not
# already have are installed, into a temporary folder on PYTHONPATH):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1 \
#     importlib_metadata zipp mlxtend==0.25.0 jsonargparse==4.53.0 docstring_parser typeshed_client \
#     huggingface_hub==2.4.0 httpx2 click safetensors regex hf-xet
# Usage (device tool, repository root):  OUT=/some/dir SECTIONS="tests train inject classifier pipeline" \
#     bash benchmarks/gpu_check.sh
# Each section has its own time limit, so one that hangs or fails does not lose the others' results.
set -uo pipefail
OUT=${OUT:-gpu_out}
SECTIONS=${SECTIONS:-"tests train inject classifier pipeline"}
SEEDS=${SEEDS:-"0 1 2"}
JOBS=${JOBS:-3}
DEVICE=${DEVICE:-cuda}        # DEVICE=cpu TRAINER=cpu STEPS=2 PAIRS=8 EPOCHS=2: a quick dry pass on a CPU
TRAINER=${TRAINER:-gpu}
STEPS=${STEPS:-30}
PAIRS=${PAIRS:-2048}
EPOCHS=${EPOCHS:-100}
TRAIN_VARIANTS=${TRAIN_VARIANTS:-"eager_fp32 module_fp32 module_bf16 optimized bf16_compiled bf16_compiled_cudagraphs"}
TRAIN_VARIANTS_256=${TRAIN_VARIANTS_256:-"eager_fp32 module_bf16 optimized"}
RUNS=$(mktemp -d)  # stage outputs stay on the device; summaries are copied to $OUT
mkdir -p "$OUT"
START=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - START )) s] $*" | tee -a "$OUT/kit.log"; }
has() { case " $SECTIONS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

DEPS=$(mktemp -d)
if ls .whl/*.whl >/dev/null 2>&1; then
  # install a wheel only when the device lacks its distribution (never shadow what is there)
  MISSING=$(python - .whl/*.whl <<'PY'
import importlib.metadata as md, re, sys
for wheel in sys.argv[1:]:
    dist = re.split(r"-\d", wheel.rsplit("/", 1)[-1], maxsplit=1)[0]
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        print(wheel)
PY
)
  # shellcheck disable=SC2086
  [ -n "$MISSING" ] && pip install --quiet --no-index --no-deps --target "$DEPS" $MISSING > "$OUT/install.log" 2>&1
  echo "$MISSING" > "$OUT/installed_wheels.txt"
fi
export PYTHONPATH="$DEPS:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
stamp "installed: $(wc -w < "$OUT/installed_wheels.txt" 2>/dev/null || echo 0) wheels"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
python - > "$OUT/versions.json" 2> "$OUT/versions.log" <<'PY'
import json, os, time
t0 = time.perf_counter()
import torch, lightning, diffusers  # noqa: E401
import diffinject.cli  # noqa: F401
imported = time.perf_counter() - t0
t1 = time.perf_counter()
gpu = torch.cuda.is_available()
if gpu:
    torch.zeros(1, device="cuda"); torch.cuda.synchronize()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "lightning": lightning.__version__,
                  "diffusers": diffusers.__version__, "gpu": torch.cuda.get_device_name(0) if gpu else None,
                  "cpu_count": os.cpu_count(), "import_s": round(imported, 2),
                  "cuda_init_s": round(time.perf_counter() - t1, 2)}))
PY
stamp "versions: $(cat "$OUT/versions.json")"

if has tests; then
  # devices visible from process start (tests/conftest.py, DIFFINJECT_TEST_GPU)
  DIFFINJECT_TEST_GPU=1 timeout 180 python -m pytest -q -m gpu -p no:cacheprovider -rs > "$OUT/gpu_tests.log" 2>&1
  stamp "gpu tests rc=$?: $(tail -1 "$OUT/gpu_tests.log")"
fi

if has train; then
  # Diffusion training: eager fp32 diffusers loop vs the module's variants, paper-size UNet, quick batch (64)
  for batch in 64 256; do
    variants=$TRAIN_VARIANTS
    [ "$batch" = 256 ] && variants=$TRAIN_VARIANTS_256
    # shellcheck disable=SC2086
    timeout 300 python benchmarks/diffusion_train.py --preset cmnist-paper --batch-size "$batch" --steps "$STEPS" \
      --warmup 5 --device "$DEVICE" --peak-tflops 989 --variants $variants \
      > "$OUT/diffusion_train_b$batch.json" 2> "$OUT/diffusion_train_b$batch.log"
    stamp "diffusion_train b$batch rc=$?"
  done
fi

if has inject; then
  timeout 240 python benchmarks/injection.py --preset cmnist-paper --steps 50 --num-pairs "$PAIRS" --naive-pairs 8 \
    --batch-size 1024 --device "$DEVICE" --autocast ${INJECT_ARGS:-} > "$OUT/injection.json" 2> "$OUT/injection.log"
  stamp "injection rc=$?"
fi

if has classifier; then
  # One classifier stage (GCE bias model, 100 epochs) with Lightning's simple profiler, GPU then CPU.
  for trainer in $TRAINER cpu; do
    run="$RUNS/classifier_$trainer"
    begin=$(date +%s%N)
    timeout 240 python -m diffinject fit --config configs/cmnist/bias.yaml --trainer "configs/trainer/$trainer.yaml" \
      --trainer.max_epochs "$EPOCHS" --trainer.profiler simple --trainer.enable_progress_bar false \
      --trainer.default_root_dir "$run" --trainer.logger.init_args.save_dir "$run" \
      --data.init_args.root "$RUNS/data" --seed_everything 0 > "$OUT/classifier_$trainer.log" 2>&1
    rc=$?
    echo "{\"trainer\": \"$trainer\", \"rc\": $rc, \"wall_s\": $(( ($(date +%s%N) - begin) / 1000000 ))e-3}" \
      > "$OUT/classifier_$trainer.json"
    run="$OUT/classifier_$trainer"
    stamp "classifier $trainer: $(cat "$run.json")"
  done
fi

if has pipeline; then
  # shellcheck disable=SC2086
  timeout "${PIPELINE_TIMEOUT:-300}" python -m diffinject.workflow.pipeline --dataset cmnist --pct 1pct \
    --profile quick --seeds $SEEDS --trainer "$TRAINER" --jobs "$JOBS" --runs "$RUNS" --data-root "$RUNS/data" \
    > "$OUT/pipeline.log" 2>&1
  stamp "pipeline rc=$?"
  mkdir -p "$OUT/pipeline"
  cp "$RUNS/cmnist/1pct/timings.json" "$RUNS/cmnist/1pct/report/results."{md,json} "$OUT/pipeline/" 2>/dev/null
  (cd "$RUNS/cmnist/1pct" && find . -name "pipeline.log" -o -name "metrics.json" | tar -cf "$OUT/pipeline/logs.tar" -T -)
fi
stamp "done"
