#!/usr/bin/env bash
# The whole pipeline on whatever this machine has: venv + install (builds rustbpe), offline data,
# tokenizer, pretraining, base evals (bpb, CORE), mid-training, SFT, DPO, RL, chat evals, report.md.
# Every stage logs to <base>/speedrun/<mode>/logs/<stage>.log and leaves a marker when it finishes;
# re-running skips finished stages and resumes the interrupted one from its last checkpoint.
usage() {
  cat <<'EOF'
usage: bash speedrun.sh [--plan] [--smoke-test] [--skip-pretrain] [--force-pretrain] [--fresh] [-h|--help]

  (no option)        GPUs: torchrun with configs/d20.py on web data (FineWeb-Edu + Chinese FineWeb-Edu),
                     downloading exactly the shards its horizon needs while the tokenizer trains; with
                     no network, a model sized to the offline corpus; one GPU: the same without torchrun;
                     CPU: configs/cpu.py and friends (tens of minutes on 2 cores)
  --plan             print mode, GPUs, config, depth, parameters, tokens, shards to fetch, epochs, an
                     estimated time and the launch command, then exit (trains nothing)
  --smoke-test       CPU, a tiny subset (pretrain 64 docs per source, SFT 16, DPO 8), a few steps per
                     stage, 8 eval samples: the whole pipeline in minutes. Uses <base>/smoke as its
                     base dir, so it never touches a real run's tokenizer or checkpoints.
  --skip-pretrain    reuse the newest valid base checkpoint (or $NANOCHAT_PRETRAINED_PATH) once it
                     loads and matches the tokenizer; if none is valid, say so and train
  --force-pretrain   pretrain even if a checkpoint exists (overrides --skip-pretrain)
  --fresh            forget finished stages and train every stage from the start (old checkpoints are
                     only replaced as the new ones are saved)
  -h, --help         this text

environment:
  NANOCHAT_BASE_DIR          data, tokenizer, checkpoints, logs, report (default ~/.cache/nanochat)
  PRETRAIN_JSON              your pretraining text: .jsonl {"text": ...} (or .parquet/.txt), comma-separated
  SFT_JSON                   your conversations (MiniMind JSONL, <think> traces too) added to SFT
  DPO_JSON                   your preference pairs for DPO: {"prompt", "chosen", "rejected"} or MiniMind's dpo.jsonl
                             (each .jsonl is cleaned first: stages clean_pretrain / clean_sft / clean_dpo write
                             <base>/clean/<kind>/<name>.clean.jsonl and a report section; training reads those)
  USE_MOE=true               pretrain a mixture-of-experts model
  DEPTH                      model depth (overrides the config's)
  WANDB_RUN                  wandb run name (default: no wandb)
  NANOCHAT_PRETRAINED_PATH   a base checkpoint for --skip-pretrain
  NANOCHAT_DATA_URL          a mirror of the web shards: shard i of source S at URL/S/shard_{i:05d}.parquet
  PRETRAIN_SOURCES           GPU web mixture (default fineweb-edu:0.8,fineweb-edu-zh:0.2)
  NANOCHAT_GPUS              the GPU count --plan plans for (default: the GPUs torch sees)
EOF
}
set -euo pipefail
cd "$(dirname "$0")"

SMOKE=0; SKIP_PRETRAIN=0; FORCE_PRETRAIN=0; FRESH=0; PLAN_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --plan) PLAN_ONLY=1 ;;
    --smoke-test) SMOKE=1 ;;
    --skip-pretrain) SKIP_PRETRAIN=1 ;;
    --force-pretrain) FORCE_PRETRAIN=1 ;;
    --fresh) FRESH=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "speedrun.sh: unknown option '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done
[ "$FORCE_PRETRAIN" = 1 ] && SKIP_PRETRAIN=0

BASE="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
if [ "$SMOKE" = 1 ]; then
  # its own base dir; the package archives are shared so nothing is downloaded twice
  mkdir -p "$BASE/smoke"
  for shared in package_cache tiktoken_cache; do
    mkdir -p "$BASE/$shared"
    [ -e "$BASE/smoke/$shared" ] || ln -s "$BASE/$shared" "$BASE/smoke/$shared"
  done
  BASE="$BASE/smoke"
fi
export NANOCHAT_BASE_DIR="$BASE"
export NANOCHAT_REPORT_DIR="$BASE/report"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
export PYTHONUNBUFFERED=1  # progress lines reach the terminal and the logs as they are printed

# ----------------------------------------------------------------------------- venv + install
t_setup=$(date +%s)
[ -x .venv/bin/python ] || python3 -m venv .venv
PY="$PWD/.venv/bin/python"
# rebuild only when the packaging or the Rust sources changed
install_hash=$(cat pyproject.toml rustbpe/Cargo.toml rustbpe/src/*.rs | sha256sum | cut -c1-16)
if [ "$PLAN_ONLY" = 1 ] && "$PY" -c "import nanochat.plan" 2>/dev/null; then
  :  # --plan only reads: any working install will do
elif [ "$(cat .venv/.nanochat-installed 2>/dev/null)" != "$install_hash" ]; then
  echo "[setup] pip install -e . (builds rustbpe; the first time also downloads torch)"
  .venv/bin/pip install -q --disable-pip-version-check -e .
  echo "$install_hash" > .venv/.nanochat-installed
fi

# ----------------------------------------------------------------------------- hardware -> mode
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
[ "$PLAN_ONLY" = 1 ] && [ -n "${NANOCHAT_GPUS:-}" ] && NGPU=$NANOCHAT_GPUS  # plan for GPUs this machine lacks
if [ "$SMOKE" = 1 ]; then MODE=smoke; elif [ "$NGPU" -gt 0 ]; then MODE=gpu; else MODE=cpu; fi
if [ "$NGPU" -gt 1 ] && [ "$MODE" = gpu ]; then
  LAUNCH=("$PWD/.venv/bin/torchrun" --standalone "--nproc_per_node=$NGPU" -m)
else
  LAUNCH=("$PY" -m)
fi
# Every stage runs as "${LAUNCH[@]}" MODULE -- OPTIONS: the `--` keeps torchrun from reading the
# script's options as its own (it takes --run=NAME for an abbreviation of --run-path).

# ----------------------------------------------------------------------------- per-mode settings
# GPU mode sizes the run to its data (nanochat.plan): web shards for the d20 horizon when the sources
# answer, else the largest model the offline corpus covers within 4 epochs.
PLAN_ARGS=(configs/d20.py "--gpus=$NGPU" "--sources=${PRETRAIN_SOURCES:-fineweb-edu:0.8,fineweb-edu-zh:0.2}")
[ -n "${DEPTH:-}" ] && PLAN_ARGS+=("--depth=$DEPTH")
[ "${USE_MOE:-false}" = true ] && PLAN_ARGS+=(--moe)
gpu_base_args() {  # BASE_ARGS, TAG and the data-reading options from the PLAN_* variables
  BASE_ARGS=(configs/d20.py "--depth=$PLAN_DEPTH" "--device_batch_size=$PLAN_DEVICE_BATCH_SIZE"
             "--total_batch_size=$PLAN_TOTAL_BATCH_SIZE" "--data_dir=$PLAN_DATA_DIR")
  [ "$PLAN_DATA" = offline ] && BASE_ARGS+=("--num_iterations=$PLAN_NUM_ITERATIONS")
  TAG="d$PLAN_DEPTH"; VOCAB=$PLAN_VOCAB; DATA_DIR_ARGS=("--data_dir=$PLAN_DATA_DIR")
}
DATA_DIR_ARGS=()
case "$MODE" in
  smoke)
    DATA_ARGS=(--max_docs=64); VOCAB=2048; TAG=d2; CTX=64
    BASE_ARGS=(configs/smoke.py)
    EVAL_ARGS=(--max_per_task=8); BPB_ARGS=(--split_tokens=4096 --device_batch_size=4)
    MID_ARGS=(--device_batch_size=4 --target_examples_per_step=8 --num_iterations=4 --eval_every=4 --eval_examples=8
              --generated_examples=32 --identity_examples=16 --chitchat_examples=16 --multiple_choice_examples=16)
    SFT_ARGS=(--device_batch_size=4 --target_examples_per_step=8 --num_iterations=4 --eval_every=4 --eval_examples=8
              --generated_examples=16 --identity_examples=16 --chitchat_examples=0 --eval_problems=0)
    DPO_ARGS=(configs/smoke_dpo.py); RL_ARGS=(configs/smoke_rl.py)
    CHAT_EVAL_ARGS=(--max_problems=8 --max_new_tokens=48) ;;
  cpu)
    DATA_ARGS=(); VOCAB=8192; TAG=d4; CTX=256
    BASE_ARGS=(configs/cpu.py)
    EVAL_ARGS=(--max_per_task=100); BPB_ARGS=(--split_tokens=262144)
    MID_ARGS=(configs/cpu_mid.py); SFT_ARGS=(configs/cpu_sft.py)
    DPO_ARGS=(configs/cpu_dpo.py); RL_ARGS=(configs/cpu_rl.py)
    CHAT_EVAL_ARGS=(--max_problems=64 --max_new_tokens=128) ;;
  gpu)
    plan_shell=$("$PY" -m nanochat.plan "${PLAN_ARGS[@]}" --shell)  # probes the web sources (seconds)
    eval "$plan_shell"
    gpu_base_args
    DATA_ARGS=(); CTX=2048
    EVAL_ARGS=(--max_per_task=0); BPB_ARGS=()
    MID_ARGS=(); SFT_ARGS=(); DPO_ARGS=(); RL_ARGS=(); CHAT_EVAL_ARGS=() ;;
esac
# every stage names its checkpoints by TAG, so other models in the base dir are never picked up
[ -n "${DEPTH:-}" ] && [ "$MODE" != gpu ] && BASE_ARGS+=("--depth=$DEPTH") && TAG="d$DEPTH"
MOE_ARGS=()
if [ "${USE_MOE:-false}" = true ]; then  # base_train tags MoE runs d<depth>_moe<experts>x<top-k>
  MOE_ARGS=(--n_experts=4 --experts_per_token=1)  # 4x the MLP weights, same active
fi
# The user's JSONL files are cleaned (nanochat.clean_data) into $CLEAN_DIR; the stages read those.
CLEAN_DIR="$BASE/clean"
cleaned() { local name; name=$(basename "$2"); echo "$CLEAN_DIR/$1/${name%.jsonl}.clean.jsonl"; }  # cleaned KIND FILE
PRETRAIN_JSONL=(); PRETRAIN_INPUT=""
if [ -n "${PRETRAIN_JSON:-}" ]; then
  IFS=, read -ra pretrain_files <<< "$PRETRAIN_JSON"
  for f in "${pretrain_files[@]}"; do  # .parquet / .txt go to the data stage as they are
    if [[ "$f" == *.jsonl ]]; then PRETRAIN_JSONL+=("$f"); f=$(cleaned pretrain "$f"); fi
    PRETRAIN_INPUT="${PRETRAIN_INPUT:+$PRETRAIN_INPUT,}$f"
  done
fi
[ -n "${SFT_JSON:-}" ] && SFT_ARGS+=("--data_path=$(cleaned sft "$SFT_JSON")")
[ -n "${DPO_JSON:-}" ] && DPO_ARGS+=("--data_path=$(cleaned dpo "$DPO_JSON")")
WANDB=(); [ -n "${WANDB_RUN:-}" ] && WANDB=("--run=$WANDB_RUN")

if [ "$PLAN_ONLY" = 1 ]; then
  if [ "$MODE" = gpu ]; then "$PY" -m nanochat.plan "${PLAN_ARGS[@]}"; else "$PY" -m nanochat.plan "${BASE_ARGS[0]}" --cpu; fi
  launch=("${LAUNCH[@]}" scripts.base_train -- "${BASE_ARGS[@]}" "${MOE_ARGS[@]}" "${WANDB[@]}")
  echo "launch      ${launch[*]}"
  exit 0
fi
[ "${USE_MOE:-false}" = true ] && TAG="${TAG}_moe4x1"

RUN_DIR="$BASE/speedrun/$MODE"; LOGS="$RUN_DIR/logs"; MARKS="$RUN_DIR/done"
[ "$FRESH" = 1 ] && rm -rf "$MARKS"
mkdir -p "$LOGS" "$MARKS"
if [ -z "$(ls -A "$MARKS")" ]; then "$PY" -m nanochat.report reset; fi  # a new run: a new report
"$PY" -m nanochat.report stage --name=setup --seconds=$(( $(date +%s) - t_setup ))
echo "[speedrun] mode $MODE ($NGPU GPU), base dir $BASE, logs $LOGS"
command -v bwrap >/dev/null || echo "[speedrun] bubblewrap is missing, so model-written code (HumanEval) runs in the" \
  "weaker fallback sandbox, which can read this machine's files: sudo apt install bubblewrap (README: Sandbox)"
RESUME=(--resume); [ "$FRESH" = 1 ] && RESUME=()  # an interrupted stage continues from its last checkpoint

# run_stage NAME CMD...: banner, log, timing; a failure stops the run naming the stage and its log
run_stage() {
  local name=$1; shift
  if [ -f "$MARKS/$name" ]; then
    echo "[$name] finished in an earlier run, skipped (bash speedrun.sh --fresh redoes everything)"
    return 0
  fi
  local log="$LOGS/$name.log" t0 rc
  echo; echo "==================== [$name] $(date '+%H:%M:%S') ===================="
  echo "\$ $*" | tee -a "$log"
  t0=$(date +%s)
  set +e
  # tee ignores SIGINT: on Ctrl-C the stage saves a checkpoint and still has its output read
  "$@" 2>&1 | (trap '' INT; tee -a "$log")
  rc=${PIPESTATUS[0]}
  set -e
  local secs=$(( $(date +%s) - t0 ))
  if [ "$rc" -ne 0 ]; then
    "$PY" -m nanochat.report stage --name="$name" --status=failed --seconds="$secs" --log="$log" || true
    echo "[speedrun] stage '$name' failed (exit $rc) after ${secs}s; log: $log" >&2
    echo "[speedrun] fix it and re-run the same command: finished stages are skipped, this one resumes" >&2
    exit "$rc"
  fi
  "$PY" -m nanochat.report stage --name="$name" --seconds="$secs" --log="$log"
  touch "$MARKS/$name"
  echo "[$name] done in ${secs}s"
}

# ----------------------------------------------------------------------------- data + tokenizer
if [ "$MODE" = gpu ] && [ "$PLAN_DATA" = web ]; then
  # nanochat's order: the shards the tokenizer needs first, then the rest in the background while it trains
  run_stage data_first "$PY" -m nanochat.dataset "--sources=$PLAN_SOURCES" "--num_shards=$PLAN_TOKENIZER_SHARDS" \
    "--output_dir=$PLAN_DATA_DIR"
  echo "[data] fetching the other shards ($PLAN_SHARDS) in the background; log: $LOGS/data.log"
  ( run_stage data "$PY" -m nanochat.dataset "--sources=$PLAN_SOURCES" "--num_shards=$PLAN_SHARDS" \
      "--output_dir=$PLAN_DATA_DIR" > /dev/null ) &
  data_pid=$!
  run_stage tokenizer "$PY" -m scripts.tok_train -- "--vocab_size=$VOCAB" --max_chars=2000000000 "${DATA_DIR_ARGS[@]}"
  run_stage tok_eval "$PY" -m scripts.tok_eval -- --references=False --hf_max_chars=5000000 "${DATA_DIR_ARGS[@]}"
  echo "[data] waiting for the background download"
  wait "$data_pid" || { echo "[speedrun] the shard download failed: $LOGS/data.log; re-run to fetch what is missing" >&2; exit 1; }
else
  if [ "$MODE" = gpu ]; then echo "[speedrun] no web data ($PLAN_WHY_OFFLINE): the offline corpus, a model sized to it"; fi
  if [ -n "${PRETRAIN_JSON:-}" ]; then
    if [ "${#PRETRAIN_JSONL[@]}" -gt 0 ]; then
      run_stage clean_pretrain "$PY" -m nanochat.clean_data --kind=pretrain "--out_dir=$CLEAN_DIR/pretrain" "${PRETRAIN_JSONL[@]}"
    fi
    run_stage data "$PY" -m nanochat.dataset "--input=$PRETRAIN_INPUT" "${DATA_ARGS[@]}"
  else
    run_stage data "$PY" -m nanochat.dataset "${DATA_ARGS[@]}"
  fi
  run_stage tokenizer "$PY" -m scripts.tok_train -- "--vocab_size=$VOCAB"
  run_stage tok_eval "$PY" -m scripts.tok_eval -- --references=False --hf_max_chars=5000000
  if [ "$MODE" = gpu ]; then  # now the corpus and tokenizer exist: count its tokens exactly, size the model again
    eval "$("$PY" -m nanochat.plan "${PLAN_ARGS[@]}" --offline --shell)"
    gpu_base_args
    [ "${USE_MOE:-false}" = true ] && TAG="${TAG}_moe4x1"
  fi
fi

# ----------------------------------------------------------------------------- cleaning the chat data
# before pretraining, so a bad file stops the run in seconds, not hours; after the tokenizer, so
# conversations longer than the context ($CTX tokens) are dropped rather than cut
if [ -n "${SFT_JSON:-}" ]; then
  run_stage clean_sft "$PY" -m nanochat.clean_data --kind=sft "--max_tokens=$CTX" "--out_dir=$CLEAN_DIR/sft" "$SFT_JSON"
fi
if [ -n "${DPO_JSON:-}" ]; then
  run_stage clean_dpo "$PY" -m nanochat.clean_data --kind=dpo "--max_tokens=$CTX" "--out_dir=$CLEAN_DIR/dpo" "$DPO_JSON"
fi

# ----------------------------------------------------------------------------- pretraining
BASE_CKPT="base_checkpoints/$TAG"
pretrain=1
if [ "$SKIP_PRETRAIN" = 1 ]; then
  candidate="${NANOCHAT_PRETRAINED_PATH:-base_checkpoints/$TAG}"
  if found=$("$PY" -m nanochat.checkpoint_manager check "$candidate" --stage=base) ||
     { [ -z "${NANOCHAT_PRETRAINED_PATH:-}" ] && found=$("$PY" -m nanochat.checkpoint_manager check base_checkpoints/latest --stage=base); }; then
    echo "[base_train] --skip-pretrain: reusing $found"
    BASE_CKPT="$found"; pretrain=0; TAG=$(basename "$(dirname "$found")")
    "$PY" -m nanochat.report stage --name=base_train --status="reused $found" --seconds=0
  else
    echo "[base_train] --skip-pretrain: no valid base checkpoint ($candidate), training one"
  fi
fi
if [ "$pretrain" = 1 ]; then
  if [ "$FORCE_PRETRAIN" = 1 ]; then
    rm -f "$MARKS/base_train" "$MARKS/base_eval" "$MARKS/base_loss"
    run_stage base_train "${LAUNCH[@]}" scripts.base_train -- "${BASE_ARGS[@]}" "${MOE_ARGS[@]}" "${WANDB[@]}"
  else
    run_stage base_train "${LAUNCH[@]}" scripts.base_train -- "${BASE_ARGS[@]}" "${MOE_ARGS[@]}" "${WANDB[@]}" "${RESUME[@]}"
  fi
fi
run_stage base_loss "${LAUNCH[@]}" scripts.base_loss -- "--checkpoint=$BASE_CKPT" "${BPB_ARGS[@]}" "${DATA_DIR_ARGS[@]}"
run_stage base_eval "${LAUNCH[@]}" scripts.base_eval -- "--checkpoint=$BASE_CKPT" "${EVAL_ARGS[@]}" "${DATA_DIR_ARGS[@]}"

# ----------------------------------------------------------------------------- chat stages
run_stage mid_train "${LAUNCH[@]}" scripts.mid_train -- "${MID_ARGS[@]}" "--base_checkpoint=$BASE_CKPT" \
  "--model_tag=$TAG" "${WANDB[@]}" "${RESUME[@]}"
run_stage chat_sft "${LAUNCH[@]}" scripts.chat_sft -- "${SFT_ARGS[@]}" "--mid_checkpoint=mid_checkpoints/$TAG" \
  "--model_tag=$TAG" "${WANDB[@]}" "${RESUME[@]}"
run_stage chat_eval_sft "${LAUNCH[@]}" scripts.chat_eval -- "--checkpoint=chatsft_checkpoints/$TAG" -a all "${CHAT_EVAL_ARGS[@]}"
run_stage chat_dpo "${LAUNCH[@]}" scripts.chat_dpo -- "${DPO_ARGS[@]}" "--sft_checkpoint=chatsft_checkpoints/$TAG" \
  "--model_tag=$TAG" "${WANDB[@]}" "${RESUME[@]}"
run_stage chat_eval_dpo "${LAUNCH[@]}" scripts.chat_eval -- "--checkpoint=chatdpo_checkpoints/$TAG" -a all "${CHAT_EVAL_ARGS[@]}"
run_stage chat_rl "${LAUNCH[@]}" scripts.chat_rl -- "${RL_ARGS[@]}" "--sft_checkpoint=chatdpo_checkpoints/$TAG" \
  "--model_tag=$TAG" "${WANDB[@]}" "${RESUME[@]}"
run_stage chat_eval_rl "${LAUNCH[@]}" scripts.chat_eval -- "--checkpoint=chatrl_checkpoints/$TAG" -a all "${CHAT_EVAL_ARGS[@]}"

# ----------------------------------------------------------------------------- report
"$PY" -m nanochat.report generate --out=report.md
[ "$MODE" = smoke ] || cp report.md "$RUN_DIR/report.md"
echo
echo "[speedrun] done: report.md (plots in report_plots/); talk to it:"
echo "  NANOCHAT_BASE_DIR=$BASE .venv/bin/python -m scripts.chat_cli"
echo "  NANOCHAT_BASE_DIR=$BASE .venv/bin/python -m scripts.chat_web"
