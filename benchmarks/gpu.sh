#!/usr/bin/env bash
# What a GPU machine runs for docs/PERFORMANCE.md's GPU section, in at most nine and a half minutes on one H200:
#   1. tests/test_cuda.py (flex and sdpa training against eager on CUDA, flex generation), while one process per
#      encoding compiles its flex kernels at the benchmark's 2048-token shape, filling inductor's on-disk caches;
#   2. benchmarks/run.py's train section at BERT-base widths in bf16, batch 4: 2048 tokens (sdpa and flex_attention),
#      then 512 tokens (sdpa), each against BertModel (sdpa: flash) and x-transformers, paired in the same run;
#   3. benchmarks/profile_step.py at 2048 tokens: where the step's GPU time goes for rope, alibi and relative_key.
# Usage: bash benchmarks/gpu.sh OUT_DIR [ENCODINGS]   (ENCODINGS of the 2048-token run, comma-separated; default
# every encoder encoding, which the 512-token run always measures)
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [ENCODINGS]}
python=${PYTHON:-python3}
all=$($python -c "from hf_relpos import POSITION_ENCODINGS as P; print(','.join(n for n, c in P.items() if not c.decoder_only))")
encodings=${2:-$all}
common=(--sections train --size base --dtype bfloat16 --batch 4 --peers)
mkdir -p "$out" /tmp/warm

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  $python -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>&1 | tail -1
} > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

start=$SECONDS
for encoding in ${encodings//,/ }; do
  TORCHINDUCTOR_COMPILE_THREADS=2 timeout 200 $python benchmarks/run.py "${common[@]}" --encodings "$encoding" \
    --lengths 2048 --kernels flex_attention --anchors '' --rounds 1 --out "/tmp/warm/$encoding.json" \
    > "/tmp/warm/$encoding.log" 2>&1 &
done
PYTHONUNBUFFERED=1 timeout 200 $python -m pytest tests/test_cuda.py -n 6 -q -p no:cacheprovider -W ignore \
  --durations=5 > "$out/tests.log" 2>&1
echo "tests: exit $? after $((SECONDS - start)) s"; tail -3 "$out/tests.log"
wait
echo "flex warm-up done after $((SECONDS - start)) s"

timeout 230 $python benchmarks/run.py "${common[@]}" --encodings "$encodings" --lengths 2048 --kernels sdpa,flex_attention \
  --out "$out/train_2048.json" > "$out/train_2048.log" 2>&1
echo "2048: exit $? after $((SECONDS - start)) s"
timeout 70 $python benchmarks/run.py "${common[@]}" --encodings "$all" --lengths 512 --kernels sdpa \
  --out "$out/train_512.json" > "$out/train_512.log" 2>&1
echo "512: exit $? after $((SECONDS - start)) s"
(cd benchmarks && timeout 50 $python profile_step.py --encodings rope,alibi,relative_key --length 2048 \
  > "$out/profile_2048.txt" 2>&1)
echo "profile: exit $? after $((SECONDS - start)) s"
