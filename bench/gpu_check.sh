#!/usr/bin/env bash
# The GPU checks in one go, at most ten minutes on one GPU (the step limits add up to 585 s): the CUDA tests,
# bench_gpu.py, 200-step 1-pretrain.py and 3-full_sft.py with --compile on a synthetic corpus, and torchrun with one
# process. Every log goes to $OUT (or out/gpu_check); summary.txt collects the lines that carry numbers.
#
#     bash bench/gpu_check.sh                 # from the repository root, on a machine with an NVIDIA GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
W=$(mktemp -d)
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/summary.txt"

step cuda_tests 120 python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_device.py
tail -n 3 "$OUT/cuda_tests.log" >>"$OUT/summary.txt"

step bench_gpu 240 python bench/bench_gpu.py --compile
grep -E "^\[|device|peak  |best|ratio|engine|decode|flash" "$OUT/bench_gpu.log" >>"$OUT/summary.txt"

# a synthetic pretraining corpus (packed rows repeat over epochs: 200 steps of 32 x 512 need 3.3M tokens) and SFT chats
python - "$W" <<'EOF'
import sys
sys.path.insert(0, "bench")
from bench_data import write_chats, write_corpus
write_corpus(f"{sys.argv[1]}/pretrain.jsonl", 12_000_000)
write_chats(sys.argv[1], 20000)
EOF

COMMON=(--out_dir "$W/out" --max_steps 200 --log_interval 20 --save_interval 1000 --epochs 100)
step pretrain 90 python 1-pretrain.py "${COMMON[@]}" --data_path "$W/pretrain.jsonl" --compile
step full_sft 75 python 3-full_sft.py "${COMMON[@]}" --data_path "$W/sft.jsonl" --compile
step torchrun_1 60 torchrun --standalone --nproc_per_node 1 1-pretrain.py --out_dir "$W/out_torchrun" \
    --data_path "$W/pretrain.jsonl" --max_steps 50 --log_interval 10 --save_interval 1000
for name in pretrain full_sft torchrun_1; do
    grep -E "step|done|error" "$OUT/$name.log" | tail -n 4 >>"$OUT/summary.txt"
done
cp "$W"/out/*.metrics.jsonl "$OUT/" 2>/dev/null
rm -rf "$W"
echo "gpu_check: $([ $status -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED); logs in $OUT" \
    | tee -a "$OUT/summary.txt"
exit $status
