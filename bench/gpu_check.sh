#!/usr/bin/env bash
# The whole GPU check, for a machine lent for a few minutes: the `-m cuda` test suite, then the training speed
# table and Muon's benchmark on the GPU. Within 13 minutes on one GPU (H100 class); prints which card, and writes everything to
# gpu_check_out/ (or $OUT/ if set) as well as to the console.
#
#     bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: not found"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
} 2>&1 | tee "$out/machine.txt"
# the suite first: its verdict matters most if time runs out (about 4 minutes on one GPU)
# -n 0: one test at a time on the one GPU (pyproject.toml runs two files at a time)
timeout 330 python -m pytest -m cuda tests -q -rs -s -n 0 2>&1 | tee "$out/pytest_cuda.txt"
echo "pytest -m cuda: exit ${PIPESTATUS[0]}" | tee -a "$out/pytest_cuda.txt"
# the speed table (each row a short real run); what is left of the 8 minutes
timeout 140 python bench/bench_train.py --device cuda --steps 6 --only table 2>&1 | tee "$out/bench_train.txt"
echo "bench_train: exit ${PIPESTATUS[0]}" | tee -a "$out/bench_train.txt"
# Muon against AdamW at GPT-2 124M (3 short runs of train_gpt2.py)
timeout 300 python bench/bench_muon.py --shape 124M --device cuda 2>&1 | tee "$out/bench_muon.txt"
echo "bench_muon: exit ${PIPESTATUS[0]}" | tee -a "$out/bench_muon.txt"
