#!/usr/bin/env bash
# The GPU checks, as one script for a machine with one GPU, torch installed and no network:
# base_train at d20 for STEPS steps with bf16 + torch.compile + flash attention (SDPA), then again
# without compile; tok/s and MFU of each; then base_loss and a chat_cli answer from the result.
#
#   bash scripts/gpu_check.sh --prepare     # here, on the CPU machine: .gpu_carry/ (<= 64 MiB)
#   bash scripts/gpu_check.sh               # there, carrying .gpu_carry; results in $OUT (or ./gpu_check_out)
#
# --prepare builds what the GPU machine cannot: the rustbpe wheel (abi3, any Python >= 3.10), the
# offline corpus and a 65536-token tokenizer. The corpus holds ~10M tokens, far fewer than d20's
# horizon: this is a speed check, so it runs a fixed number of steps with --max_epochs raised.
# A dry run on CPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_DEPTH=2 GPU_CHECK_STEPS=12 GPU_CHECK_EAGER_STEPS=12 \
#   GPU_CHECK_EXTRA="--max_seq_len=128 --device_batch_size=4 --total_batch_size=512" PY=.venv/bin/python bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu_carry
DEPTH=${GPU_CHECK_DEPTH:-20}
STEPS=${GPU_CHECK_STEPS:-200}
EAGER_STEPS=${GPU_CHECK_EAGER_STEPS:-60}
DEVICE=${GPU_CHECK_DEVICE:-cuda}

if [ "${1:-}" = --prepare ]; then
  PY=${PY:-.venv/bin/python}
  rm -rf "$CARRY" && mkdir -p "$CARRY/base"
  grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> "$(git rev-parse --git-common-dir)/info/exclude"
  "$PY" -m pip wheel -q --no-deps -w "$CARRY" .  # nanochat + the rustbpe extension (abi3)
  cp -r "${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/base_data" "$CARRY/base/base_data"
  NANOCHAT_BASE_DIR="$PWD/$CARRY/base" "$PY" -m scripts.tok_train -- --vocab_size=65536
  du -sh "$CARRY"
  exit 0
fi

OUT=${OUT:-$PWD/gpu_check_out}
PY=${PY:-python3}
mkdir -p "$OUT"
if ! "$PY" -c "import rustbpe" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "$CARRY"/nanochat-*.whl
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" NANOCHAT_BASE_DIR="$PWD/$CARRY/base" PYTHONUNBUFFERED=1
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/env.txt"
COMMON=(configs/d20.py "--depth=$DEPTH" "--device_type=$DEVICE" --max_epochs=100000 --eval_every=-1 --sample_every=-1
        --save_every=-1 --eval_tokens=1048576 --device_batch_size=32 --total_batch_size=65536 ${GPU_CHECK_EXTRA:-})
summary() {  # mean tok/s and MFU over the steps after the first 10 (compile and warm-up)
  "$PY" - "$1" <<'PY'
import re, sys
rows = [(float(t.replace(",", "")), m) for t, m in re.findall(r"tok/s ([0-9,]+) \| mfu ([0-9.]+%|n/a)", open(sys.argv[1]).read())][10:]
tok = sum(t for t, _ in rows) / max(1, len(rows))
mfu = [float(m[:-1]) for _, m in rows if m != "n/a"]
print(f"{sys.argv[1]}: {len(rows)} steps, {tok:,.0f} tok/s, MFU {sum(mfu) / len(mfu):.1f}%" if mfu else f"{sys.argv[1]}: {tok:,.0f} tok/s")
PY
}
"$PY" -m scripts.base_train -- "${COMMON[@]}" --compile=True "--num_iterations=$STEPS" --model_tag=compiled 2>&1 | tee "$OUT/compiled.log"
"$PY" -m scripts.base_train -- "${COMMON[@]}" --compile=False "--num_iterations=$EAGER_STEPS" --model_tag=eager 2>&1 | tee "$OUT/eager.log"
"$PY" -m scripts.base_loss -- --checkpoint=base_checkpoints/compiled --split_tokens=1048576 2>&1 | tee "$OUT/base_loss.log"
"$PY" -m scripts.chat_cli -- --checkpoint=base_checkpoints/compiled -p "The capital of France is" --max_tokens=32 2>&1 | tee "$OUT/chat_cli.log"
{ summary "$OUT/compiled.log"; summary "$OUT/eager.log"; } | tee "$OUT/summary.txt"
