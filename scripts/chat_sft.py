"""
Supervised fine-tuning: polish the mid-trained model on clean conversations (identity, calculator
arithmetic, spelling and python tool use, some small talk, and your own data), loss on assistant tokens only.
Mid-training is the same loop on another mixture from the base model: scripts/mid_train.py runs
this file with mid-training's defaults (the `_mid` columns below).

    python -m scripts.chat_sft --mid_checkpoint=mid_checkpoints/latest.pt --device_batch_size=4
    python -m scripts.chat_sft --data_path=my_chats.jsonl      # add your own conversations
    torchrun --nproc_per_node=2 -m scripts.chat_sft
    python -m scripts.chat_sft --resume                        # continue the newest checkpoint
    python -m scripts.chat_sft --lora_rank=16                  # LoRA: train adapters only, saved alone too

Every eval_every steps (and at the last): the val loss per assistant token and greedy accuracies on
held-out Arithmetic, Spelling, PythonTool and Identity problems (with the tools). Writes
chatsft_checkpoints/<tag> (mid_checkpoints/<tag>); with --lora_rank the merged model as usual plus
the adapter alone in adapter_<step>.pt. Ctrl-C saves and exits; --resume continues exactly.
"""
import os
import sys

if __package__ in (None, ""):  # also runnable as `python scripts/chat_sft.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_mid = globals().get("_mid_training", False)  # set by scripts/mid_train.py

# ----------------------------------------------------------------------------- defaults
run = "dummy"                  # wandb run name; "dummy" logs nowhere
use_dummy_wandb = False
device_type = ""               # cuda | mps | cpu; empty: autodetect
source_checkpoint = "base_checkpoints/latest.pt" if _mid else "mid_checkpoints/latest.pt"  # alias --base_checkpoint / --mid_checkpoint
model_tag = ""                 # default: the source checkpoint's tag
max_seq_len = 0                # 0: the model's
device_batch_size = 32 if _mid else 4         # rows per forward pass
target_examples_per_step = 64 if _mid else 32  # rows per optimizer step: sets gradient accumulation
num_iterations = -1            # -1: one epoch of the mixture
pack = _mid                    # True: several conversations per row; False: one per row (padded)
init_lr_frac = 1.0 if _mid else 0.02          # fraction of the pretraining learning rates to start from
embedding_lr, unembedding_lr, matrix_lr = 0.2, 0.004, 0.02  # AdamW (embedding, lm_head), Muon (matrices)
weight_decay = 0.0
grad_clip = 1.0                # 0 disables clipping
warmup_ratio, warmdown_ratio, final_lr_frac = 0.0, 0.2 if _mid else 1.0, 0.0  # lr: warm-up, constant, linear warm-down to final
eval_every = 150 if _mid else 100             # val loss (+ task accuracies) every N steps and at the end; -1: never
eval_examples = 400 if _mid else 200          # val conversations (the tasks' test splits, never trained on)
eval_problems = 0 if _mid else 20             # held-out problems per task for the accuracies; 0: none
eval_max_tokens = 64
save_every = -1                # -1: only at the end (and on Ctrl-C)
keep_last = 2
resume = False
compile = None                 # torch.compile: True | False | None (on for CUDA)
seed = 42
max_memory_frac = 0.9
data_path = ""                 # user conversations (MiniMind JSONL), added to the mixture
generated_examples = 20000 if _mid else 2000  # arithmetic and spelling problems each, half as many python tool ones
identity_examples = 1000 if _mid else 500     # who-are-you conversations (EN + ZH)
chitchat_examples = -1 if _mid else 1000      # human small talk (chitchat-dataset); -1: all, 0: none
multiple_choice_examples = -1 if _mid else 0  # ARC/OBQA/... multiple choice (letters); -1: all, 0: none
lora_rank = 0                  # > 0: train LoRA adapters of this rank only (base frozen); 0: full fine-tuning
lora_alpha = 32.0              # adapter scale alpha / rank
lora_targets = "attn.c_q,attn.c_v,mlp.c_fc"  # linear layers that get adapters (name patterns, comma-separated)
lora_lr = 1e-3                 # AdamW lr of the adapters (the *_lr / init_lr_frac above are for full fine-tuning)

from nanochat.configurator import configure
user_config = configure(globals(), aliases={"base_checkpoint": "source_checkpoint", "mid_checkpoint": "source_checkpoint"})
# -----------------------------------------------------------------------------

import time

import torch

from nanochat import lora, report, tasks
from nanochat.chat_data import conversation_batches, conversation_eval_batches, estimate_rows_per_epoch
from nanochat.checkpoint_manager import list_steps, load_checkpoint, open_training_source
from nanochat.common import all_reduce_sum, autocast_for, compute_init, print0, seed_everything
from nanochat.data_stats import format_stats, task_stats, write_stats
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_loss
from nanochat.tokenizer import get_tokenizer, tokenizer_fingerprint
from nanochat.training import TrainingLoop, restore_train_state, train_state

stage, source_stage, title = ("mid", "base", "Mid-training") if _mid else ("chatsft", "mid", "Chat SFT")
ddp, rank, local_rank, world_size, device = compute_init(device_type)
master = rank == 0
seed_everything(seed)
autocast = autocast_for(device)
tokenizer = get_tokenizer()


# ----------------------------------------------------------------------------- data
def mixture(split, n_generated, n_identity, n_chitchat, n_multiple_choice):
    """The mix of one split (train, or test for the val loss); a count of 0 drops a source, -1 takes all."""
    generated = [tasks.Arithmetic(split, size=n_generated), tasks.Spelling(split, size=n_generated),
                 tasks.PythonTool(split, size=n_generated // 2)]  # half as many: several patterns, one format
    identity = [tasks.Identity(split, size=n_identity)]
    sources = generated + identity if _mid else identity + generated  # the order seeds each mix's shuffle
    if n_chitchat:
        sources.append(tasks.ChitChat(split, stop=n_chitchat if n_chitchat > 0 else None))
    if n_multiple_choice:
        sources.append(tasks.MultipleChoice(split, stop=n_multiple_choice if n_multiple_choice > 0 else None))
    return [s for s in sources if len(s)]


train_sources = mixture("train", generated_examples, identity_examples, chitchat_examples, multiple_choice_examples)
if data_path:
    train_sources.append(tasks.JSONLConversations(data_path))
print0(f"{title} mix: " + ", ".join(f"{type(t).__name__} {len(t):,}" for t in train_sources))
n_val = {"chitchat": eval_examples if chitchat_examples else 0, "mc": eval_examples if multiple_choice_examples else 0}
train_task = tasks.TaskMixture(train_sources, seed=seed)
val_task = tasks.TaskMixture(mixture("test", eval_examples, eval_examples, n_val["chitchat"], n_val["mc"]), seed=seed)
eval_tasks = {name: task("test", size=eval_problems) for name, task in
              [("arithmetic", tasks.Arithmetic), ("spelling", tasks.Spelling), ("python_tool", tasks.PythonTool),
               ("identity", tasks.Identity)]}

# ----------------------------------------------------------------------------- model, batch, optimizer, resume
src = open_training_source(source_checkpoint, source_stage, stage, device, tokenizer, model_tag=model_tag, resume=resume,
                           lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets)
orig_model, model_config, checkpoint_dir = src.model, src.meta["model_config"], src.checkpoint_dir
compile = device.type == "cuda" if compile is None else compile
model = torch.compile(orig_model, dynamic=False) if compile else orig_model
B, T = device_batch_size, max_seq_len or model_config["sequence_len"]
if target_examples_per_step % (B * world_size):
    raise SystemExit(f"target_examples_per_step {target_examples_per_step} must be a multiple of "
                     f"device_batch_size*world_size = {B * world_size}")
grad_accum_steps = target_examples_per_step // (B * world_size)
rows_per_step = B * world_size * grad_accum_steps
epoch_rows = estimate_rows_per_epoch(train_task, tokenizer, T, pack)
if num_iterations <= 0:  # one epoch of the mixture
    num_iterations = max(1, epoch_rows // rows_per_step)
print0(f"{stage}: from {src.description} | model: {model_config}")
print0(f"train: {len(train_task):,} conversations | val: {len(val_task):,} | batch: {rows_per_step} rows = "
       f"{B} x {world_size} ranks x {grad_accum_steps} accum of {T} tokens | steps: {num_iterations:,}")

if lora_rank > 0:
    trainable, total = lora.count_parameters(orig_model)
    print0(f"LoRA: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    optimizers = lora.setup_optimizers(orig_model, lora_lr, weight_decay=weight_decay)
else:
    optimizers = orig_model.setup_optimizers(unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                                             matrix_lr=matrix_lr, weight_decay=weight_decay)
    for opt in optimizers:  # fine-tuning starts from a fraction of the pretraining learning rates
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["initial_lr"] * init_lr_frac

start_step, loader_states, history = 0, None, None
if src.resume_step is not None:
    _, saved_train_state, meta = load_checkpoint(checkpoint_dir, src.resume_step, device, load_optimizer=True, rank=rank)
    loader_states = restore_train_state(saved_train_state, optimizers, world_size * grad_accum_steps)
    start_step, history = meta["step"], meta["history"]
    print0(f"resumed from {checkpoint_dir} step {start_step}")
    del saved_train_state
train_loaders = [conversation_batches(train_task, tokenizer, B, T, device, lane=rank * grad_accum_steps + k,
                                      num_lanes=world_size * grad_accum_steps,
                                      state=loader_states[k] if loader_states else None, pack=pack)
                 for k in range(grad_accum_steps)]
loader_states = [dict(s) for s in loader_states] if loader_states else [None] * grad_accum_steps
tokenizer_hash = tokenizer_fingerprint(tokenizer)
if master:  # what this run trains on, per task, beside its config snapshot
    stats = task_stats(train_task, val_task, tokenizer, round(num_iterations * rows_per_step * len(train_task) / epoch_rows))
    write_stats(checkpoint_dir, stats)
    print0(format_stats(stats))


def save(step):
    meta = {"step": step, "val_loss": loop.last("val loss"), "model_config": model_config, "config": user_config,
            "tokenizer_vocab_size": tokenizer.get_vocab_size(), "tokenizer_hash": tokenizer_hash,
            "num_iterations": num_iterations, "source": src.source}
    model_state = orig_model.state_dict()
    if lora_rank > 0:
        model_state, meta["lora"] = lora.checkpoint_state(orig_model, checkpoint_dir, step, src.meta, stage, lora_rank,
                                                          lora_alpha, lora_targets, master)
    loop.save(checkpoint_dir, step, model_state, train_state(optimizers, loader_states, world_size * grad_accum_steps),
              meta, rank=rank, keep_last=keep_last, config={**user_config, "num_iterations": num_iterations},
              curve=("loss_curve.png", f"{stage}: train loss", "loss", "val loss", "val loss"))
    if master and lora_rank > 0:
        lora.prune_adapters(checkpoint_dir, list_steps(checkpoint_dir))


# ----------------------------------------------------------------------------- training loop
loop = TrainingLoop(num_iterations, start_step=start_step, history=history, eval_every=eval_every, save_every=save_every,
                    grad_clip=grad_clip, warmup_ratio=warmup_ratio, warmdown_ratio=warmdown_ratio,
                    final_lr_frac=final_lr_frac, max_memory_frac=max_memory_frac, run=run, config=user_config, use_dummy_wandb=use_dummy_wandb, device=device,
                    flops_per_token=orig_model.estimate_flops(), world_size=world_size)
step = start_step
while True:
    if loop.eval_now(step):
        model.eval()
        val_batches = conversation_eval_batches(val_task, tokenizer, B, T, device, lane=rank, num_lanes=world_size,
                                                max_examples=eval_examples)
        metrics = {"val loss": evaluate_loss(model, val_batches, device, autocast)}
        if master and eval_problems > 0:  # greedy replies (with the tools) to held-out problems
            engine = Engine(orig_model, tokenizer)
            with autocast:
                metrics.update({f"{name} acc": tasks.accuracy(task, engine, eval_max_tokens)
                                for name, task in eval_tasks.items()})
        model.train()
        loop.log_eval(step, metrics)

    if loop.save_or_stop(step, save):
        break

    # one optimizer step: grad_accum_steps micro-batches, each from its own data lane. The loss is
    # the sum over every assistant token of the step (all micro-batches and ranks) over their count:
    # conversations differ in length, and a mean of per-batch means would weight short answers more.
    batches = []
    for k in range(grad_accum_steps):
        inputs, targets, loader_states[k] = next(train_loaders[k])
        batches.append((inputs, targets))
    n_tokens = all_reduce_sum(sum((targets >= 0).sum() for _, targets in batches).float()).clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    for inputs, targets in batches:
        with autocast:
            loss = model(inputs, targets, loss_reduction="sum")
        (loss * (world_size / n_tokens)).backward()  # the distributed optimizers average over the ranks
        loss_sum += loss.detach()
    loss_value = (all_reduce_sum(loss_sum) / n_tokens).item()  # also syncs the device: honest timings
    lrm = loop.optimizer_step(orig_model, optimizers, step)
    step += 1
    loop.log(step, loss_value, lrm, tokens=rows_per_step * T)

if master and loop.history["loss"]:
    accuracies = {k: loop.last(k) for k in loop.history if k.endswith(" acc")}
    report.log_section(title, config=user_config, plots=[os.path.join(checkpoint_dir, "loss_curve.png")],
                       stage="MID" if _mid else "SFT",
                       metrics={"checkpoint": f"{checkpoint_dir} step {step}", "source": src.source, "steps": step,
                                "final train loss": loop.last("loss"), "val loss": loop.last("val loss"), **accuracies,
                                "wall minutes": round((time.time() - loop.t_start) / 60, 2)},
                       summary={"val loss": loop.last("val loss")} if loop.last("val loss") is not None else {})
loop.finish(step)
