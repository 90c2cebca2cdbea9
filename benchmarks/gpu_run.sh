#!/usr/bin/env bash
# One prepared GPU session (see benchmarks/README.md): the CUDA tests, then the overhead
# benchmark on the realistic GPU problem (torchvision ResNet-50, batch 64, 224x224, bf16
# autocast) and on CIFAR ResNet-18 (batch 32) against Cockpit. Results go to $OUT (or
# benchmarks/results). Expects python3 with torch and CUDA; wheels for missing packages in
# .whl/ (pydantic, google-crc32c, cockpit-for-pytorch, backpack-for-pytorch, ...).
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site \
    . ./plugins/ikkuna-* || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-$//')
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs plugins/tests/test_plugins_on_cuda.py \
    plugins/ikkuna-curvature/tests plugins/ikkuna-train/tests/test_trainer.py -k "cuda or CUDA or gpu" \
    2>&1 | tail -15
timeout 260 python3 benchmarks/overhead.py --device cuda --problems resnet50 \
    --variants plain,plain-again,exporter,norms,all,all-sub10,fused,quickstart \
    --steps 5 --rounds 8 --out "$OUT/$GPU-resnet50.json" 2>"$OUT/$GPU-resnet50.log"
tail -5 "$OUT/$GPU-resnet50.log"
timeout 200 python3 benchmarks/overhead.py --device cuda --problems resnet18 \
    --variants plain,exporter,norms,all,all-sub10,fused,quickstart,tb-norms,cockpit-norms,cockpit-all \
    --steps 5 --rounds 8 --out "$OUT/$GPU-resnet18.json" 2>"$OUT/$GPU-resnet18.log"
tail -5 "$OUT/$GPU-resnet18.log"
