#!/usr/bin/env bash
# One-shot GPU checks for a lent H100/H200 (device tool): benchmarks as JSON plus the `gpu` tests.
# Expects wheels for what the device lacks in .whl/ (diffusers, importlib_metadata, mlxtend), carried along.
# Usage on the device: OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
DEPS=$(mktemp -d)
if ls .whl/*.whl >/dev/null 2>&1; then
  pip install --quiet --no-index --no-deps --target "$DEPS" .whl/*.whl
fi
export PYTHONPATH="$DEPS:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.csv" 2>&1
python - > "$OUT/versions.json" <<'PY'
import json, torch, lightning, diffusers
print(json.dumps({"torch": torch.__version__, "lightning": lightning.__version__,
                  "diffusers": diffusers.__version__, "gpu": torch.cuda.get_device_name(0)}))
PY
# Diffusion training: eager fp32 vs the optimised path (bf16, channels_last, fused AdamW, compile).
timeout 240 python benchmarks/diffusion_train.py --preset cmnist-paper --batch-size 128 --steps 40 --warmup 5 \
  --device cuda --peak-tflops 989 --compile > "$OUT/diffusion_train.json" 2> "$OUT/diffusion_train.log"
# Injection: naive vs optimised, same pairs, S = 50 (random paper-size UNet: throughput only).
timeout 240 python benchmarks/injection.py --preset cmnist-paper --steps 50 --num-pairs 1024 --naive-pairs 16 \
  --batch-size 512 --device cuda --autocast --channels-last > "$OUT/injection.json" 2> "$OUT/injection.log"
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "done: $(ls "$OUT")"
