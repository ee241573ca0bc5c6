"""
Distillation: train a smaller student on the data and on a bigger teacher's next-token
distributions, loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T) (nanochat/distill.py),
or fine-tune on <think> ... </think> reasoning traces with those tokens up-weighted.

    # knowledge distillation on the pretraining corpus; val bpb is the measure
    python -m scripts.chat_distill --teacher=base_checkpoints/d4 --depth=2 --num_iterations=100
    # the same student, same data and steps, without a teacher (the baseline): alpha = 1
    python -m scripts.chat_distill --from_scratch --depth=2 --num_iterations=100
    # on conversations (assistant tokens only), the student starting from a distilled base
    python -m scripts.chat_distill --mode=chat --teacher=chatsft_checkpoints/d4 --init_checkpoint=distill_checkpoints/d2
    # reasoning traces (nanochat/tasks/reasoning.py) on a chat model, <think> / </think> weighted x10
    python -m scripts.chat_distill --mode=reasoning --init_checkpoint=chatsft_checkpoints/d4 --init_lr_frac=0.1
    python -m scripts.chat_distill ... --resume                  # continue the newest checkpoint of the tag

Modes: base (data_loader rows of the pretraining shards; eval: val bits per byte), chat (the SFT mix
of conversations; eval: val loss per assistant token), reasoning (Reasoning traces; eval: val loss
and greedy accuracy on held-out problems). The student is new (--depth, --aspect_ratio or --n_embd,
--n_kv_head) or starts from --init_checkpoint. Teacher and student must share the tokenizer: checked
against the checkpoints' records, with an error naming both. Writes distill_checkpoints/<tag>
(default d<depth>[_scratch][_<mode>]); Ctrl-C saves, --resume continues exactly.
"""
import os
import sys

if __package__ in (None, ""):  # also runnable as `python scripts/chat_distill.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses

import torch

from nanochat import report, tasks
from nanochat.chat_data import conversation_batches, conversation_eval_batches
from nanochat.checkpoint_manager import (CheckpointError, build_model, find_last_step, load_checkpoint, load_model,
                                         stage_dir)
from nanochat.common import all_reduce_sum, autocast_for, compute_init, get_base_dir, print0, seed_everything
from nanochat.configurator import configure
from nanochat.dataloader import data_loader
from nanochat.distill import model_distill_loss, token_weights
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth
from nanochat.loss_eval import evaluate_bpb, evaluate_loss
from nanochat.tasks.reasoning import Reasoning
from nanochat.tokenizer import get_token_bytes, get_tokenizer, tokenizer_fingerprint
from nanochat.training import TrainingLoop, restore_train_state, train_state

# ----------------------------------------------------------------------------- defaults
run = "dummy"                  # wandb run name; "dummy" logs nowhere
use_dummy_wandb = False
device_type = ""               # cuda | mps | cpu; empty: autodetect
mode = "base"                  # base (pretraining text) | chat (conversations) | reasoning (<think> traces)
teacher = ""                   # teacher checkpoint, e.g. base_checkpoints/d4; required unless from_scratch (or reasoning)
from_scratch = False           # no teacher: alpha = 1 (plain CE), the baseline for the same student
alpha = 0.5                    # weight of the hard (data) loss; 1 - alpha on the teacher's soft targets
temperature = 2.0              # softens both distributions in the KL term (scaled back by T^2)
special_token_weight = 10.0    # loss weight of <think> / </think> targets (1 elsewhere)
# student: a new model of this shape, or the weights of init_checkpoint
init_checkpoint = ""           # start the student from this checkpoint (its architecture) instead
depth = 2
aspect_ratio = 64              # width = aspect_ratio * depth ...
n_embd = 0                     # ... unless given here
n_kv_head = 0                  # 0: as many as query heads
max_seq_len = 0                # 0: the teacher's (else init checkpoint's, else 256) sequence length
# optimization
num_iterations = 100
device_batch_size = 16         # rows of max_seq_len tokens per forward pass
total_batch_size = 8192        # tokens per optimizer step (rows x max_seq_len): sets gradient accumulation
embedding_lr, unembedding_lr, matrix_lr = 0.2, 0.004, 0.02  # AdamW (embedding, lm_head), Muon (matrices)
init_lr_frac = 1.0             # times the lrs above; lower it when continuing a trained checkpoint
weight_decay = 0.0
grad_clip = 1.0                # 0 disables clipping
warmup_ratio, warmdown_ratio, final_lr_frac = 0.0, 0.4, 0.0  # lr: warm-up, constant, linear warm-down to final
# evaluation, checkpoints
eval_every = 50                # every N steps and at the end; -1: never
eval_tokens = 131072           # base mode: val tokens for bits per byte
eval_examples = 200            # chat / reasoning: val conversations for the val loss
eval_problems = 50             # reasoning: held-out problems for the greedy accuracy; 0: none
eval_max_tokens = 192
save_every = -1                # -1: only at the end (and on Ctrl-C)
keep_last = 2
model_tag = ""                 # default d<depth>[_scratch][_<mode>]
resume = False
seed = 42
max_memory_frac = 0.9
data_dir = ""                  # base mode: default <base>/base_data
# conversation data
pack = True                    # chat / reasoning: pack several conversations per row
generated_examples = 2000      # chat: arithmetic and spelling problems each
identity_examples = 500        # chat
chitchat_examples = 0          # chat: a slice of chitchat-dataset; 0: none
reasoning_examples = 20000     # reasoning: training traces
user_config = configure(globals())
# -----------------------------------------------------------------------------

if mode not in ("base", "chat", "reasoning"):
    raise SystemExit(f"chat_distill: --mode must be base, chat or reasoning, got {mode!r}")
if not 0.0 <= alpha <= 1.0 or temperature <= 0:
    raise SystemExit(f"chat_distill: need 0 <= alpha <= 1 and temperature > 0 (got alpha={alpha}, temperature={temperature})")
if from_scratch:
    teacher, alpha = "", 1.0
elif not teacher and mode != "reasoning":
    raise SystemExit("chat_distill: give --teacher=<checkpoint> (e.g. base_checkpoints/d4), or --from_scratch for the "
                     "no-teacher baseline")
if not teacher:
    alpha = 1.0

ddp, rank, local_rank, world_size, device = compute_init(device_type)
master = rank == 0
seed_everything(seed)
autocast = autocast_for(device)

tokenizer = get_tokenizer()
token_bytes = get_token_bytes(device=device)
vocab_size = tokenizer.get_vocab_size()


def load(arg, what):
    """Teacher and student are both checked against this run's tokenizer: distillation compares
    their next-token distributions id by id, so they must share it."""
    try:
        model, meta, directory, step = load_model(arg, device, tokenizer, phase="train" if what == "student" else "eval")
    except CheckpointError as e:
        raise SystemExit(f"chat_distill: {what}: {e} (teacher and student must use the tokenizer in "
                         f"{os.path.join(get_base_dir(), 'tokenizer')})") from None
    return model, meta, f"{os.path.relpath(directory, get_base_dir())} step {step}"


# ----------------------------------------------------------------------------- teacher
teacher_model, teacher_desc = None, None
if teacher:
    teacher_model, teacher_meta, teacher_desc = load(teacher, "teacher")
    teacher_model.requires_grad_(False)
    print0(f"teacher: {teacher_desc} | {teacher_model.config} | {teacher_model.num_params():,} params")

# ----------------------------------------------------------------------------- student
default_T = teacher_model.config.sequence_len if teacher_model is not None else 256
if init_checkpoint:
    student_source, source_meta, student_desc = load(init_checkpoint, "student")
    model_config = student_source.config
    default_T = max_seq_len or model_config.sequence_len
else:
    width = n_embd or aspect_ratio * depth
    model_config = dataclasses.replace(config_from_depth(1, vocab_size, max_seq_len or default_T, aspect_ratio=width,
                                                         n_kv_head=n_kv_head or None), n_layer=depth)
T = max_seq_len or default_T
model_config = dataclasses.replace(model_config, sequence_len=T)
tag = model_tag or f"d{model_config.n_layer}" + ("_scratch" if from_scratch else "") + ("" if mode == "base" else f"_{mode}")
checkpoint_dir = os.path.join(stage_dir("distill"), tag)
resume_step = find_last_step(checkpoint_dir) if resume else None
if resume and resume_step is None:
    print0(f"resume: no checkpoint in {checkpoint_dir}, starting from the beginning")
if resume_step is not None:
    model, _ = build_model(checkpoint_dir, resume_step, device, phase="train")
    model_config = model.config
elif init_checkpoint:
    model = student_source
else:
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()
num_params = model.num_params()
flops_per_token = model.estimate_flops()

tokens_per_micro_step = device_batch_size * T * world_size
if total_batch_size % tokens_per_micro_step:
    raise SystemExit(f"chat_distill: total_batch_size {total_batch_size} must be a multiple of "
                     f"device_batch_size*max_seq_len*world_size = {tokens_per_micro_step}")
grad_accum_steps = total_batch_size // tokens_per_micro_step
num_lanes = world_size * grad_accum_steps
print0(f"student: {model_config} | {num_params:,} params" + (f" | from {student_desc}" if init_checkpoint else ""))
print0(f"mode {mode} | alpha {alpha} | temperature {temperature} | batch: {total_batch_size:,} tokens = "
       f"{device_batch_size} x {T} x {world_size} ranks x {grad_accum_steps} accum | steps: {num_iterations}")

optimizers = model.setup_optimizers(unembedding_lr=unembedding_lr, embedding_lr=embedding_lr, matrix_lr=matrix_lr,
                                    weight_decay=weight_decay)
for opt in optimizers:
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] = group["initial_lr"] * init_lr_frac

start_step, loader_states, history = 0, None, None
if resume_step is not None:
    _, saved_train_state, meta = load_checkpoint(checkpoint_dir, resume_step, device, load_optimizer=True, rank=rank)
    loader_states = restore_train_state(saved_train_state, optimizers, num_lanes)
    start_step, history = meta["step"], meta["history"]
    print0(f"resumed from {checkpoint_dir} step {start_step}")
    del saved_train_state

# ----------------------------------------------------------------------------- data
think_ids = [tokenizer.encode_special("<think>"), tokenizer.encode_special("</think>")]
if mode == "base":
    def train_loader(lane, state):
        return data_loader(device_batch_size, T, "train", tokenizer, device, lane=lane, num_lanes=num_lanes,
                           state=state, data_dir=data_dir or None)
    eval_steps = max(1, eval_tokens // tokens_per_micro_step)
else:
    if mode == "chat":
        def mix(split, n):
            sources = [tasks.Identity(split, size=min(n, identity_examples)), tasks.Arithmetic(split, size=n),
                       tasks.Spelling(split, size=n)]
            if chitchat_examples:
                sources.append(tasks.ChitChat(split, stop=chitchat_examples))
            return tasks.TaskMixture([s for s in sources if len(s)], seed=seed)
        train_task, val_task = mix("train", generated_examples), mix("test", eval_examples)
    else:
        train_task, val_task = Reasoning("train", size=reasoning_examples), Reasoning("test", size=eval_examples)

    def train_loader(lane, state):
        return conversation_batches(train_task, tokenizer, device_batch_size, T, device, lane=lane, num_lanes=num_lanes,
                                    state=state, pack=pack)
train_loaders = [train_loader(rank * grad_accum_steps + k, loader_states[k] if loader_states else None)
                 for k in range(grad_accum_steps)]
loader_states = [dict(s) for s in loader_states] if loader_states else [None] * grad_accum_steps
reasoning_eval = Reasoning("test", size=eval_problems) if mode == "reasoning" and eval_problems > 0 else None
val_name = "val bpb" if mode == "base" else "val loss"


def evaluate(m):
    """Base: val bits per byte. Chat / reasoning: val loss per assistant token."""
    m.eval()
    if mode == "base":
        val_loader = data_loader(device_batch_size, T, "val", tokenizer, device, lane=rank, num_lanes=world_size,
                                 data_dir=data_dir or None)
        with autocast:
            value = evaluate_bpb(m, val_loader, eval_steps, token_bytes)
    else:
        batches = conversation_eval_batches(val_task, tokenizer, device_batch_size, T, device, lane=rank,
                                            num_lanes=world_size, max_examples=eval_examples)
        value = evaluate_loss(m, batches, device, autocast)
    m.train()
    return value


def reasoning_accuracy(m):
    """Greedy completions of the held-out reasoning problems (tools allowed) -> (fraction correct,
    fraction that think first: open with <think> and close it)."""
    m.eval()
    conversations = list(reasoning_eval)
    with autocast:
        texts = Engine(m, tokenizer).complete_many(conversations, eval_max_tokens)  # decoded together
    correct = thought = 0
    for conversation, text in zip(conversations, texts):
        correct += reasoning_eval.evaluate(conversation, text)
        thought += text.startswith("<think>") and "</think>" in text
    m.train()
    return correct / len(reasoning_eval), thought / len(reasoning_eval)


def save(step):
    meta = {"step": step, "val": loop.last(val_name), val_name.replace(" ", "_"): loop.last(val_name), "mode": mode,
            "model_config": dataclasses.asdict(model_config), "config": user_config, "tokenizer_vocab_size": vocab_size,
            "tokenizer_hash": tokenizer_fingerprint(tokenizer), "teacher": teacher_desc, "alpha": alpha,
            "temperature": temperature, "num_iterations": num_iterations}
    loop.save(checkpoint_dir, step, model.state_dict(), train_state(optimizers, loader_states, num_lanes), meta,
              rank=rank, keep_last=keep_last, config={**user_config, "alpha": alpha, "teacher": teacher},
              curve=("loss_curve.png", f"distill {tag}: train loss", "loss", val_name, val_name))


# ----------------------------------------------------------------------------- training loop
teacher_val = None
if teacher_model is not None and mode == "base":  # every rank: evaluate_bpb all-reduces
    teacher_val = evaluate(teacher_model)
    print0(f"teacher {val_name}: {teacher_val:.4f}")
loop = TrainingLoop(num_iterations, start_step=start_step, history=history, eval_every=eval_every, save_every=save_every,
                    grad_clip=grad_clip, warmup_ratio=warmup_ratio, warmdown_ratio=warmdown_ratio,
                    final_lr_frac=final_lr_frac, max_memory_frac=max_memory_frac, run=run, config=user_config, use_dummy_wandb=use_dummy_wandb, device=device,
                    flops_per_token=flops_per_token, world_size=world_size)
step = start_step
while True:
    if loop.eval_now(step):
        metrics = {val_name: evaluate(model)}
        if reasoning_eval is not None and master:
            metrics["reasoning acc"], metrics["thinks"] = reasoning_accuracy(model)
        loop.log_eval(step, metrics)

    if loop.save_or_stop(step, save):
        break

    # one optimization step; the loss is per unit of token weight over the whole step (all ranks)
    batches = []
    for k in range(grad_accum_steps):
        x, y, loader_states[k] = next(train_loaders[k])
        batches.append((x, y, token_weights(y, think_ids, special_token_weight)))
    total_weight = all_reduce_sum(sum(w.sum() for _, _, w in batches).float()).clamp(min=1e-6)
    sums = torch.zeros(3, device=device)
    for x, y, w in batches:
        with autocast:
            loss_sum, ce_sum, kl_sum = model_distill_loss(model, teacher_model, x, y, w, alpha, temperature)
        balance = model.moe_balance_loss() / grad_accum_steps  # MoE student: the load balance (0 if dense)
        (loss_sum * (world_size / total_weight) + balance).backward()  # the distributed optimizers average over ranks
        sums += torch.stack([loss_sum.detach(), ce_sum, kl_sum]).float()
    lrm = loop.optimizer_step(model, optimizers, step)
    loss_value, ce_value, kl_value = (all_reduce_sum(sums) / total_weight).tolist()  # syncs: honest timing
    step += 1
    loop.log(step, loss_value, lrm, tokens=total_batch_size, metrics={"ce": ce_value, "kl": kl_value})

val_metric, accuracy = loop.last(val_name), loop.last("reasoning acc")
if master and step == num_iterations:
    # the summary table merges a stage's rows: keep the keys distinct per mode (base: the bar's val bpb)
    summary = {{"base": val_name, "chat": "chat val loss"}[mode]: round(val_metric, 4)} \
        if val_metric is not None and mode != "reasoning" else {}
    metrics = {"mode": mode, "teacher": teacher_desc or "none (from scratch)", "alpha": alpha, "temperature": temperature,
               "student params": num_params, "steps": step, val_name: val_metric}
    if teacher_val is not None:
        metrics[f"teacher {val_name}"] = teacher_val
    if accuracy is not None:
        metrics["reasoning acc"] = summary["reasoning acc"] = accuracy
        metrics["thinks (<think> ... </think> first)"] = loop.last("thinks")
    # the no-teacher baseline gets a section of its own but not the DISTILL row of the summary table
    title = f"Distillation baseline ({mode}, {tag})" if from_scratch else f"Distillation ({mode}, {tag})"
    report.log_section(title, metrics=metrics, config=user_config, plots=[os.path.join(checkpoint_dir, "loss_curve.png")],
                       stage=None if from_scratch else "DISTILL", summary=summary)
loop.finish(step)  # stopped early (after saving): exit 130 / 3, not 0
