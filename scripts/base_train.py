"""
Pretrain the base model on the parquet shards.

    python -m scripts.base_train configs/cpu.py --depth=4 --max_seq_len=256
    torchrun --nproc_per_node=2 -m scripts.base_train -- configs/dual_gpu/stable_26gb.py --run=NAME
    python -m scripts.base_train configs/cpu.py --resume        # continue the newest checkpoint
    python -m scripts.base_train configs/cpu.py --n_experts=4 --experts_per_token=1   # MoE MLPs
    python -m scripts.base_train configs/cpu.py --compile=True --dtype=bfloat16       # the GPU code paths, on CPU

The `--` after the module keeps torchrun from reading the script's options as its own (it would
take --run=NAME for its --run-path). Before the first step the run checks that its data covers
its horizon: more than --max_epochs passes over the corpus stops it with the figures and the fixes.

Ctrl-C (or SIGTERM) saves a checkpoint and exits; `--resume` continues from it with the same
model, optimizer, data position and RNG, so an interrupted run ends where an uninterrupted one would.
"""
import os
import sys

if __package__ in (None, ""):  # also runnable as `python scripts/base_train.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import time

import torch

from nanochat import report
from nanochat.checkpoint_manager import find_last_step, load_checkpoint
from nanochat.common import (all_reduce_sum, autocast_for, broadcast_from_master, compute_cleanup, compute_dtype, compute_init,
                             get_base_dir, print0, seed_everything)
from nanochat.configurator import configure
from nanochat.data_stats import corpus_stats, format_stats, write_stats
from nanochat.dataloader import data_loader
from nanochat.dataset import default_data_dir
from nanochat.gpt import GPT, config_from_depth
from nanochat.loss_eval import evaluate_bpb, unigram_bpb
from nanochat.plan import epoch_problem
from nanochat.tokenizer import get_token_bytes, get_tokenizer, tokenizer_fingerprint
from nanochat.training import TrainingLoop, restore_train_state, train_state

# ----------------------------------------------------------------------------- defaults
run = "dummy"                  # wandb run name; "dummy" logs nowhere
use_dummy_wandb = False
device_type = ""               # cuda | mps | cpu; empty: autodetect
# model
depth = 20                     # the one dial: width = 64 * depth, heads and lrs follow
max_seq_len = 2048
n_kv_head = 0                  # grouped-query attention; 0: as many as query heads
# mixture of experts in place of the MLP (nanochat.gpt.MoE); 0 experts: dense
n_experts = 0
experts_per_token = 2          # top-k
shared_expert = False          # an always-on expert beside the routed ones
moe_aux_loss_coef = 0.01       # weight of the load-balancing loss
moe_capacity_factor = 0.0      # > 0 (e.g. 1.25): fixed expert buckets, overflow dropped; static shapes for torch.compile
# horizon: num_iterations if > 0, else tokens = target_param_data_ratio * params (Chinchilla ~20;
# active params for MoE, so a MoE run gets the tokens of the dense model with its compute per token)
num_iterations = -1
target_param_data_ratio = 20
# batch: gradient accumulation fills total_batch_size tokens per step
device_batch_size = 32
total_batch_size = 524288
# optimization
embedding_lr, unembedding_lr, matrix_lr = 0.2, 0.004, 0.02  # AdamW (embedding, lm_head), Muon (matrices)
weight_decay = 0.0
grad_clip = 1.0                # 0 disables clipping
warmup_ratio, warmdown_ratio, final_lr_frac = 0.0, 0.2, 0.0  # lr: warm-up, constant, linear warm-down to final
# evaluation, samples, checkpoints
eval_every = 250               # val bits per byte every N steps (and at the end)
eval_tokens = 20 * 524288
sample_every = 2000
save_every = -1                # -1: only at the end (and on Ctrl-C)
keep_last = 2                  # older checkpoints are removed once a new one is complete
model_tag = ""                 # default d<depth> (MoE: d<depth>_moe<experts>x<k>)
resume = False
resume_from_step = -1
compile = None                 # torch.compile the model: True | False | None (on for CUDA); works on CPU too (inductor)
dtype = ""                     # autocast dtype: bfloat16 | float32; empty: bf16 on CUDA GPUs that have it, else fp32
max_epochs = 4.0               # refuse a horizon that reads the data more often than this (it would memorize)
seed = 42
max_memory_frac = 0.9          # save and stop before RSS passes this fraction of RAM
data_dir = ""                  # default: <base>/base_data
user_config = configure(globals())
# -----------------------------------------------------------------------------

ddp, rank, local_rank, world_size, device = compute_init(device_type)
master = rank == 0
seed_everything(seed)  # the same on every rank: identical initial weights (there is no DDP broadcast)
dtype = getattr(torch, dtype) if dtype else compute_dtype(device.type)
autocast = autocast_for(device, dtype)

tokenizer = get_tokenizer()
token_bytes = get_token_bytes(device=device)
vocab_size = tokenizer.get_vocab_size()

moe = dict(n_experts=n_experts, experts_per_token=experts_per_token, shared_expert=shared_expert,
           moe_aux_loss_coef=moe_aux_loss_coef, moe_capacity_factor=moe_capacity_factor) if n_experts else {}
model_config = config_from_depth(depth, vocab_size=vocab_size, sequence_len=max_seq_len,
                                 n_kv_head=n_kv_head or None, **moe)
with torch.device("meta"):  # sizes first: the data check below needs no memory for the weights
    model = GPT(model_config)
num_params = model.num_params()
num_active_params = model.num_active_params()  # == num_params for a dense model
flops_per_token = model.estimate_flops()
compile = device.type == "cuda" if compile is None else compile
print0(f"compute: {device.type}, {str(dtype).removeprefix('torch.')}, torch.compile {'on' if compile else 'off'}")

tokens_per_micro_step = device_batch_size * max_seq_len * world_size
assert total_batch_size % tokens_per_micro_step == 0, \
    f"total_batch_size {total_batch_size} must be a multiple of device_batch_size*max_seq_len*world_size = {tokens_per_micro_step}"
grad_accum_steps = total_batch_size // tokens_per_micro_step
if num_iterations <= 0:
    num_iterations = max(1, target_param_data_ratio * num_active_params // total_batch_size)
print0(f"model: {model_config}")
print0(f"params: {num_params:,}" + (f" ({num_active_params:,} active per token)" if n_experts else "")
       + f" | FLOPs/token: {flops_per_token:.3e} | vocab: {vocab_size:,}")
if n_experts and compile and moe_capacity_factor == 0:
    print0("note: MoE buckets sized by the largest expert load change shape every step; "
           "--moe_capacity_factor=1.25 keeps them static for torch.compile")
print0(f"batch: {total_batch_size:,} tokens = {device_batch_size} x {max_seq_len} x {world_size} ranks x {grad_accum_steps} accum"
       f" | steps: {num_iterations:,} | tokens: {num_iterations * total_batch_size:,}")

default_tag = f"d{depth}_moe{n_experts}x{experts_per_token}" if n_experts else f"d{depth}"  # never over a dense run's
checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag or default_tag)

# ----------------------------------------------------------------------------- does the data cover the horizon?
tokenizer_hash = tokenizer_fingerprint(tokenizer)
epoch_stop = None
if master:  # what this run trains on, per source; the tokens it holds against the tokens the run needs
    dataset_stats = corpus_stats(data_dir or None, tokenizer, num_iterations * total_batch_size)
    print0(format_stats(dataset_stats))
    print0(f"data: {dataset_stats['_run']['train_tokens']:,} train tokens | this run: {num_iterations * total_batch_size:,} "
           f"tokens = {dataset_stats['_run']['epochs']:.2f} epochs (limit {max_epochs:g})")
    epoch_stop = epoch_problem(dataset_stats, max_epochs, depth, vocab_size, max_seq_len, target_param_data_ratio,
                               total_batch_size, data_dir or default_data_dir(), n_kv_head=n_kv_head or None, **moe)
    if epoch_stop is None:
        write_stats(checkpoint_dir, dataset_stats)
epoch_stop = broadcast_from_master(epoch_stop)
if epoch_stop:
    print0(f"error: {epoch_stop}")
    compute_cleanup()
    sys.exit(1)

# ----------------------------------------------------------------------------- model, optimizers, resume
model.to_empty(device=device)
model.init_weights()
orig_model = model
if compile:
    model = torch.compile(model, dynamic=False)
optimizers = orig_model.setup_optimizers(unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                                         matrix_lr=matrix_lr, weight_decay=weight_decay)
start_step, loader_states, history = 0, None, None
if resume or resume_from_step >= 0:
    step_to_load = resume_from_step if resume_from_step >= 0 else find_last_step(checkpoint_dir)
    if step_to_load is None:
        print0(f"resume: no checkpoint in {checkpoint_dir}, starting from scratch")
    else:
        model_state, saved_train_state, meta = load_checkpoint(checkpoint_dir, step_to_load, device, load_optimizer=True, rank=rank)
        orig_model.load_state_dict(model_state)
        loader_states = restore_train_state(saved_train_state, optimizers, world_size * grad_accum_steps)
        start_step, history = meta["step"], meta["history"]
        print0(f"resumed from {checkpoint_dir} step {start_step}")
        del model_state, saved_train_state

train_loaders = [data_loader(device_batch_size, max_seq_len, "train", tokenizer, device,
                             lane=rank * grad_accum_steps + k, num_lanes=world_size * grad_accum_steps,
                             state=loader_states[k] if loader_states else None, data_dir=data_dir or None)
                 for k in range(grad_accum_steps)]
loader_states = [dict(s) for s in loader_states] if loader_states else [None] * grad_accum_steps
eval_steps = max(1, eval_tokens // (device_batch_size * max_seq_len * world_size))


def save(step):
    meta = {"step": step, "val_bpb": loop.last("val bpb"), "model_config": model_config.__dict__, "config": user_config,
            "tokenizer_vocab_size": vocab_size, "tokenizer_hash": tokenizer_hash}
    loop.save(checkpoint_dir, step, orig_model.state_dict(), train_state(optimizers, loader_states, world_size * grad_accum_steps),
              meta, rank=rank, keep_last=keep_last, config={**user_config, "num_iterations": num_iterations},
              curve=("loss_curve.png", f"base d{depth}: train loss", "loss", "val bpb", "val bpb"))


def sample(prompts, max_new_tokens=24):
    orig_model.eval()
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        with autocast:
            ids += list(orig_model.generate(ids, max_new_tokens, temperature=0))
        print0(f"  {tokenizer.decode(ids[1:])!r}")
    orig_model.train()


# ----------------------------------------------------------------------------- training loop
loop = TrainingLoop(num_iterations, start_step=start_step, history=history, eval_every=eval_every, save_every=save_every,
                    grad_clip=grad_clip, warmup_ratio=warmup_ratio, warmdown_ratio=warmdown_ratio,
                    final_lr_frac=final_lr_frac, max_memory_frac=max_memory_frac, run=run, config=user_config, use_dummy_wandb=use_dummy_wandb, device=device,
                    flops_per_token=flops_per_token, world_size=world_size)
step = start_step
while True:
    if loop.eval_now(step):
        model.eval()
        val_loader = data_loader(device_batch_size, max_seq_len, "val", tokenizer, device,
                                 lane=rank, num_lanes=world_size, data_dir=data_dir or None)
        with autocast:
            val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
        model.train()
        if step == start_step and master:  # context for the first number: a unigram model's bpb on the same batches
            unigram = unigram_bpb(data_loader(device_batch_size, max_seq_len, "train", tokenizer, data_dir=data_dir or None),
                                  data_loader(device_batch_size, max_seq_len, "val", tokenizer, data_dir=data_dir or None),
                                  eval_steps, token_bytes)
            print0(f"unigram baseline: val bpb {unigram:.4f}")
        loop.log_eval(step, {"val bpb": val_bpb})
    if master and (step == num_iterations or (sample_every > 0 and step > start_step and step % sample_every == 0)):
        sample(["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                "中国的首都是", "The opposite of hot is"])

    if loop.save_or_stop(step, save):
        break

    # one optimization step: grad_accum_steps micro-batches, each from its own data lane
    train_loss = torch.zeros((), device=device)
    for k in range(grad_accum_steps):
        x, y, loader_states[k] = next(train_loaders[k])
        with autocast:
            loss = model(x, y)
        (loss / grad_accum_steps).backward()
        train_loss += loss.detach() / grad_accum_steps
    lrm = loop.optimizer_step(orig_model, optimizers, step)
    # the loss of the whole batch, identical however it is split across ranks (SUM then divide: gloo has no AVG)
    loss_value = (all_reduce_sum(train_loss) / world_size).item()  # also syncs the device: honest timings
    step += 1
    # MoE: the load-balancing loss of the last micro-batch (1 = balanced; included in the loss)
    loop.log(step, loss_value, lrm, tokens=total_batch_size,
             metrics={"moe aux": orig_model.moe_aux_loss.item()} if n_experts else None)

if master and loop.history["loss"]:
    report.log_section("Base training", config=user_config, plots=[os.path.join(checkpoint_dir, "loss_curve.png")],
                       metrics={"checkpoint": f"{checkpoint_dir} step {step}", "parameters": num_params,
                                "active parameters": num_active_params, "steps": step, "tokens": step * total_batch_size,
                                "final train loss": loop.last("loss"), "val bpb": loop.last("val bpb"),
                                "wall minutes": round((time.time() - loop.t_start) / 60, 2)})
loop.finish(step)
