"""
RL with verifiable rewards (GRPO-style) from an SFT checkpoint: sample a group of answers per
prompt with the engine (calculator included), reward the correct ones, push their tokens up.

    python -m scripts.chat_rl --sft_checkpoint=chatsft_checkpoints/latest.pt --num_samples=8 --reward_weight=1.0
    python -m scripts.chat_rl --beta=0.02 --ppo_epochs=2     # KL to the SFT model, PPO clipping in play
    torchrun --nproc_per_node=2 -m scripts.chat_rl               # prompts split over the ranks
    python -m scripts.chat_rl --resume                         # continue the newest checkpoint

Each step takes prompts_per_step prompts from the train splits (Arithmetic, LongArithmetic with
more digits, Spelling), samples num_samples completions of each, scores them
    reward = reward_weight * correct + (1 - reward_weight) * well_formed
(correct: the task's checker, 0/1; well_formed: finished by itself with a readable answer;
reward_weight=1: the pure verifiable reward), turns them into group-normalised advantages and
takes ppo_epochs optimizer steps on the clipped token-level policy-gradient loss (+ beta * KL to
the frozen SFT model). Only tokens the model sampled are trained, never the calculator's output.
Every eval_every steps (and at the start and the end): pass@1 and pass@eval_k on held-out test
problems, eval_samples samples each at eval_temperature. Writes chatrl_checkpoints/<tag>.
See nanochat/rl.py for the formulas.
"""
import os
import random
import sys
import zlib

if __package__ in (None, ""):  # also runnable as `python scripts/chat_rl.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from nanochat import report, tasks
from nanochat.checkpoint_manager import build_model, load_checkpoint, open_training_source
from nanochat.common import all_reduce_sum, compute_init, print0, seed_everything
from nanochat.configurator import configure
from nanochat.engine import Engine
from nanochat.rl import (completion_text, group_advantages, pass_at_k, policy_loss, rollout_batch, sample_groups,
                         shaped_reward, token_logprobs)
from nanochat.tokenizer import get_tokenizer
from nanochat.training import TrainingLoop, restore_train_state, train_state

# ----------------------------------------------------------------------------- defaults
run = "dummy"                  # wandb run name; "dummy" logs nowhere
use_dummy_wandb = False
device_type = ""               # cuda | mps | cpu; empty: autodetect
sft_checkpoint = "chatsft_checkpoints/latest.pt"
model_tag = ""                 # default: the SFT checkpoint's tag
num_iterations = 100           # RL steps
prompts_per_step = 8           # prompts per step (all ranks together)
num_samples = 8                # samples per prompt: the group its advantages are normalised in
max_new_tokens = 64            # per sample (tool output included)
temperature = 1.0              # sampling for the rollouts
top_k = 0                      # 0: off (on-policy samples)
device_batch_size = 16         # sequences per forward/backward
ppo_epochs = 1                 # optimizer steps per batch of rollouts; > 1 makes the clipping matter
clip_eps = 0.2                 # PPO clip of pi/pi_old to [1-eps, 1+eps]; 0: off
beta = 0.0                     # weight of the k3 KL to the frozen SFT model; 0: no reference model
normalize_std = True           # advantages divided by the group's std (False: reward - group mean only)
reward_weight = 1.0            # reward = w * correct + (1 - w) * well_formed (see the docstring)
arithmetic_examples = 20000    # train prompts per source (0 drops the source); all sources are shuffled together
long_arithmetic_examples = 20000
spelling_examples = 5000
long_min_digits = 3            # LongArithmetic operands (train and test)
long_max_digits = 5
init_lr_frac = 0.05            # fraction of the pretraining learning rates
embedding_lr, unembedding_lr, matrix_lr = 0.2, 0.004, 0.02  # AdamW (embedding, lm_head), Muon (matrices)
weight_decay = 0.0
grad_clip = 1.0                # 0 disables clipping
warmup_ratio, warmdown_ratio, final_lr_frac = 0.0, 1.0, 0.0  # lr: warm-up, constant, linear warm-down to final
eval_every = 20                # pass@k on the held-out problems every N steps (and at start/end); -1: never
eval_tasks = "arithmetic,long_arithmetic,spelling"  # comma list of arithmetic, long_arithmetic, spelling
eval_problems = 50             # held-out test problems per eval task
eval_samples = 8               # samples per problem (n of pass@k)
eval_k = 8                     # pass@1 and pass@eval_k are logged
eval_temperature = 1.0
save_every = -1                # -1: only at the end (and on Ctrl-C)
keep_last = 2
resume = False
seed = 42
max_memory_frac = 0.9
user_config = configure(globals())
# -----------------------------------------------------------------------------

if not 1 <= eval_k <= eval_samples:
    raise SystemExit(f"eval_k={eval_k} must be between 1 and eval_samples={eval_samples}")
if num_samples < 2:
    raise SystemExit(f"num_samples={num_samples}: a group needs at least 2 samples (advantages are relative)")
if not 0.0 <= reward_weight <= 1.0:
    raise SystemExit(f"reward_weight={reward_weight} must be in [0, 1]")

ddp, rank, local_rank, world_size, device = compute_init(device_type)
master = rank == 0
seed_everything(seed)
tokenizer = get_tokenizer()


def sum_over_ranks(values):
    """Sum a list of floats over the ranks (a no-op with one process)."""
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def make_task(name, split, size):
    if name == "arithmetic":
        return tasks.Arithmetic(split, size=size)
    if name == "long_arithmetic":
        return tasks.LongArithmetic(split, size=size, min_digits=long_min_digits, max_digits=long_max_digits)
    if name == "spelling":
        return tasks.Spelling(split, size=size)
    raise SystemExit(f"unknown eval task {name!r}: use arithmetic, long_arithmetic, spelling")


# ----------------------------------------------------------------------------- data
# train prompts: every (task, index) of the sources, shuffled once; step s uses pool entries
# s*P .. s*P+P-1 (mod len), so a resumed run sees exactly the prompts of a straight one
sources = [make_task(name, "train", n) for name, n in
           [("arithmetic", arithmetic_examples), ("long_arithmetic", long_arithmetic_examples),
            ("spelling", spelling_examples)] if n > 0]
if not sources:
    raise SystemExit("no training prompts: set arithmetic_examples, long_arithmetic_examples or spelling_examples > 0")
pool = [(task, i) for task in sources for i in range(len(task))]
random.Random(seed).shuffle(pool)
eval_sets = {name: make_task(name, "test", eval_problems) for name in eval_tasks.split(",") if name} if eval_problems > 0 else {}

# ----------------------------------------------------------------------------- model
src = open_training_source(sft_checkpoint, "chatsft", "chatrl", device, tokenizer, model_tag=model_tag, resume=resume)
model, model_config, checkpoint_dir, resume_step = src.model, src.meta["model_config"], src.checkpoint_dir, src.resume_step
ref_model = None
if beta > 0:  # the frozen reference is always the SFT checkpoint, also when resuming
    ref_model, _ = build_model(src.source_dir, src.source_step, device, phase="eval")
    ref_model.requires_grad_(False)
engine = Engine(model, tokenizer)
stop_ids = engine.stop_ids
pad_id = tokenizer.get_bos_token_id()

optimizers = model.setup_optimizers(unembedding_lr=unembedding_lr, embedding_lr=embedding_lr, matrix_lr=matrix_lr,
                                    weight_decay=weight_decay)
for opt in optimizers:  # RL starts from a fraction of the pretraining learning rates
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] = group["initial_lr"] * init_lr_frac

start_step, history = 0, None
if resume_step is not None:
    _, saved_train_state, saved_meta = load_checkpoint(checkpoint_dir, resume_step, device, load_optimizer=True, rank=rank)
    restore_train_state(saved_train_state, optimizers, world_size)
    start_step, history = saved_meta["step"], saved_meta["history"]
    print0(f"resumed from {checkpoint_dir} step {start_step}")
    del saved_train_state
print0(f"chat_rl: from {src.description} | model: {model_config}")
print0("train prompts: " + ", ".join(f"{type(t).__name__} {len(t):,}" for t in sources) +
       f" | {prompts_per_step} prompts x {num_samples} samples per step | steps: {num_iterations}")


# ----------------------------------------------------------------------------- eval
def evaluate(step):
    """pass@1 and pass@eval_k per eval task; each rank samples its share of the problems.
    The seeds depend on the problem only, so evals at different steps see the same draws' noise."""
    metrics = {}
    for name, task in eval_sets.items():
        totals = [0.0, 0.0, 0.0]  # pass@1 sum, pass@k sum, problems
        mine = range(rank, len(task), world_size)
        conversations = [task.get(i) for i in mine]
        groups = sample_groups(engine, [tokenizer.render_for_completion(c) for c in conversations],  # all at once
                               [zlib.crc32(f"eval-{name}-{i}".encode()) for i in mine], eval_samples, max_new_tokens,
                               eval_temperature)
        for conversation, samples in zip(conversations, groups):
            c = sum(task.evaluate(conversation, completion_text(tokenizer, toks, stop_ids)) for toks, _, _ in samples)
            totals[0] += pass_at_k(eval_samples, c, 1)
            totals[1] += pass_at_k(eval_samples, c, eval_k)
            totals[2] += 1
        p1, pk, n = sum_over_ranks(totals)
        metrics[f"{name} pass@1"] = p1 / n
        metrics[f"{name} pass@{eval_k}"] = pk / n
    return metrics


# ----------------------------------------------------------------------------- one RL step
def rollouts(step):
    """This rank's prompts of the step -> (sequences, advantages, mean reward, mean correct, samples)."""
    sequences, advantages = [], []
    reward_sum = correct_sum = count = 0.0
    mine = range(rank, prompts_per_step, world_size)
    drawn = [pool[(step * prompts_per_step + j) % len(pool)] for j in mine]
    conversations = [task.get(index) for task, index in drawn]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    groups = sample_groups(engine, prompts, [zlib.crc32(f"{seed}-{step}-{j}".encode()) for j in mine], num_samples,
                           max_new_tokens, temperature, top_k or None)  # every prompt's samples decoded together
    for (task, _), conversation, prompt, samples in zip(drawn, conversations, prompts, groups):
        rewards, corrects = [], []
        for toks, _, finished in samples:
            text = completion_text(tokenizer, toks, stop_ids)
            corrects.append(task.reward(conversation, text))
            rewards.append(shaped_reward(task, conversation, text, finished, reward_weight))
        adv = group_advantages(rewards, normalize_std=normalize_std)
        reward_sum, correct_sum, count = reward_sum + sum(rewards), correct_sum + sum(corrects), count + len(rewards)
        if beta == 0 and not adv.abs().sum() > 0:
            continue  # equal rewards: no policy gradient, and without a KL term nothing to learn
        for (toks, masks, _), a in zip(samples, adv.tolist()):
            if any(masks):
                sequences.append((prompt, toks, masks))
                advantages.append(a)
    return sequences, advantages, reward_sum, correct_sum, count


def train_on(sequences, advantages, step):
    """ppo_epochs optimizer steps on one batch of rollouts; returns (pg loss, kl, clip fraction,
    trained tokens), summed over the ranks. pi_old is the policy before the first of them."""
    micro = []
    for s in range(0, len(sequences), device_batch_size):
        inputs, targets = rollout_batch(sequences[s:s + device_batch_size], pad_id, device)
        adv = torch.tensor(advantages[s:s + device_batch_size], dtype=torch.float32, device=device)
        with torch.no_grad():
            old = token_logprobs(model, inputs, targets) if ppo_epochs > 1 else None
            ref = token_logprobs(ref_model, inputs, targets) if ref_model is not None else None
        micro.append((inputs, targets, adv, old, ref))
    local_tokens = float(sum((t >= 0).sum().item() for _, t, _, _, _ in micro))
    (n_tokens,) = sum_over_ranks([local_tokens])
    stats = [0.0, 0.0, 0.0]  # pg, kl sum, clipped tokens (last epoch)
    for epoch in range(ppo_epochs):
        stats = [0.0, 0.0, 0.0]
        for inputs, targets, adv, old, ref in micro:
            logp = token_logprobs(model, inputs, targets)
            old_logp = old if old is not None else logp.detach()
            # each rank's share of sum / n_tokens; the distributed optimizers average over ranks
            loss, st = policy_loss(logp, old_logp, adv, targets >= 0, clip_eps, ref, beta,
                                   num_tokens=max(n_tokens, 1.0) / world_size)
            (loss + model.moe_balance_loss() / len(micro)).backward()  # MoE: the load balance (0 if dense)
            stats = [stats[0] + st["pg"].item() / world_size, stats[1] + st["kl_sum"].item(), stats[2] + st["clip_sum"].item()]
        if not micro:  # this rank drew no trainable samples; zero gradients keep the collectives in step
            sum(p.sum() for p in model.parameters()).mul(0.0).backward()
        if n_tokens > 0:
            loop.optimizer_step(model, optimizers, step)
        model.zero_grad(set_to_none=True)
    pg, kl_sum, clip_sum = sum_over_ranks(stats)
    return pg, kl_sum / max(n_tokens, 1.0), clip_sum / max(n_tokens, 1.0), n_tokens


# ----------------------------------------------------------------------------- loop
def save(step):
    meta = {"step": step, "model_config": model_config, "config": user_config,
            "tokenizer_vocab_size": tokenizer.get_vocab_size(), "tokenizer_hash": src.meta.get("tokenizer_hash"),
            "num_iterations": num_iterations, "source": src.source}
    first_metric = next((k for k in loop.history if k.endswith("pass@1")), None)
    loop.save(checkpoint_dir, step, model.state_dict(), train_state(optimizers, None, world_size), meta, rank=rank,
              keep_last=keep_last, config=user_config,
              curve=("reward_curve.png", "chat_rl: mean reward", "reward", first_metric, first_metric or ""))


loop = TrainingLoop(num_iterations, start_step=start_step, history=history, eval_every=eval_every if eval_sets else 0,
                    save_every=save_every, grad_clip=grad_clip, warmup_ratio=warmup_ratio, warmdown_ratio=warmdown_ratio,
                    final_lr_frac=final_lr_frac, max_memory_frac=max_memory_frac, run=run, config=user_config, use_dummy_wandb=use_dummy_wandb, device=device,
                    world_size=world_size)
step = start_step
while True:
    if loop.eval_now(step):
        loop.log_eval(step, evaluate(step))

    if loop.save_or_stop(step, save):
        break

    sequences, advantages, reward_sum, correct_sum, count = rollouts(step)
    pg, kl, clip_frac, n_tokens = train_on(sequences, advantages, step)
    reward_sum, correct_sum, count = sum_over_ranks([reward_sum, correct_sum, count])
    lrm = loop.lr_multiplier(step)
    step += 1
    metrics = {"reward": reward_sum / max(count, 1), "correct": correct_sum / max(count, 1),
               **({"kl": kl} if beta > 0 else {}), "clip": clip_frac}
    loop.log(step, pg, lrm, tokens=n_tokens, metrics=metrics)

history = loop.history
if master:
    names = [k for k in history if "pass@" in k]
    first, final = {k: history[k][0] for k in names}, {k: history[k][-1] for k in names}
    table = None
    if names:
        table = (f"| held-out ({eval_problems} problems, {eval_samples} samples at T={eval_temperature}) | "
                 f"step {history['val_step'][0]} | step {history['val_step'][-1]} |\n|---|---|---|\n")
        table += "".join(f"| {k} | {first[k]:.3f} | {final[k]:.3f} |\n" for k in names)
    recent = history.get("reward", [])[-10:]
    report.log_section("Chat RL", metrics={**{f"final {k}": v for k, v in final.items()},
                                           **{f"initial {k}": v for k, v in first.items()}, "steps": step,
                                           "mean reward (last 10 steps)": sum(recent) / len(recent) if recent else "n/a"},
                       config=user_config, table=table, plots=[os.path.join(checkpoint_dir, "reward_curve.png")],
                       stage="RL", summary={k: round(v, 4) for k, v in final.items() if k.endswith("pass@1")})
loop.finish(step)
