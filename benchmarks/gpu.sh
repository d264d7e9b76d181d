#!/bin/sh
# Every check that needs a CUDA GPU, in one go: the CUDA tests (timing calibration, per-device
# replay memory), the accuracy benchmark, and estimated against measured per-layer times (KIND=h100
# or h200: the kind of this GPU). Logs and results go to $1.
#     sh benchmarks/gpu.sh gpu-out
set -u
OUT=${1:-gpu-out}
mkdir -p "$OUT"
nvidia-smi -L 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tee "$OUT/cuda-tests.log"
python3 benchmarks/accuracy.py --device cuda --out "$OUT/acc" 2>&1 | tee "$OUT/accuracy.log"
tar czf "$OUT/acc.tgz" -C "$OUT" acc && rm -rf "$OUT/acc"
python3 benchmarks/estimate_vs_measured.py --device cuda --kind "${KIND:-h100}" --dtype bfloat16 2>&1 | tee "$OUT/estimate-vs-measured.log"
