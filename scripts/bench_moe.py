"""
Benchmark: training tok/s of a mixture-of-experts model against a dense model with the same
ACTIVE parameters (the parameters one token uses), side by side in one process, on the same
batches, with the same optimizers (Muon + AdamW) and lr schedule; then both models' val bits
per byte after the same number of steps.

Equal active parameters: each of the experts_per_token (+ shared) experts a token uses has
hidden width 4 * n_embd / (experts_per_token + shared), so its MLP work per token equals the
dense MLP's; the MoE model holds n_experts / experts_per_token times the MLP weights. The
difference in tok/s is then the price of routing (router, sort, copies; padding for "bmm").
Both ways of running the experts (nanochat.gpt.MOE_DISPATCH) are timed by default: "loop"
(a loop over the experts, no padding) and "bmm" (padded buckets, batched matmuls); the two
MoE models start from the same weights and compute the same function.
The models take their steps in turn (each step on the same batches, a different model going
first), so a busy machine slows all alike, and both
wall-clock and CPU-time tok/s are printed (CPU time, of the whole process, hardly depends on
what else runs on the machine; with --threads=1 it is the work itself). The MoE model holds
n_experts / experts_per_token times the MLP weights and Muon orthogonalizes every one of them
each step, a cost per step, not per token: the optimizer's share is printed apart, and
total_batch_size (gradient accumulation, 8192 tokens as configs/cpu.py) sets how it amortizes.

    python -m scripts.bench_moe                                   # depth 4, 4 experts top-1 vs dense
    python -m scripts.bench_moe --threads=1                       # a shared, busy machine
    python -m scripts.bench_moe --n_experts=8 --experts_per_token=2 --steps=40
"""
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import time
from contextlib import nullcontext

import torch

import nanochat.gpt as gpt
from nanochat.common import autodetect_device_type, compute_dtype, seed_everything
from nanochat.configurator import configure
from nanochat.dataloader import data_loader
from nanochat.gpt import GPT, config_from_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import lr_multiplier, set_schedule

# ----------------------------------------------------------------------------- defaults
device_type = ""
depth = 4
max_seq_len = 256
device_batch_size = 8
total_batch_size = 8192       # tokens per optimizer step (gradient accumulation)
steps = 8                     # training steps of each model
warmup_steps = 1              # first steps left out of the timing (allocator, caches)
n_experts = 4
experts_per_token = 1
shared_expert = False
moe_aux_loss_coef = 0.01
dispatch = "both"             # loop | bmm | both: how the MoE model runs its experts
eval_tokens = 32768           # val bpb of both after `steps` (0: skip)
threads = 0                   # CPU intra-op threads; 0: torch's default
seed = 1337
user_config = configure(globals())
# -----------------------------------------------------------------------------

device_type = device_type or autodetect_device_type()
if threads > 0:
    torch.set_num_threads(threads)
device = torch.device(device_type)
dtype = compute_dtype(device_type)
autocast = torch.amp.autocast(device_type=device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
tokenizer = get_tokenizer()
token_bytes = get_token_bytes(device=device)
vocab_size = tokenizer.get_vocab_size()
assert total_batch_size % (device_batch_size * max_seq_len) == 0, "total_batch_size must be a multiple of device_batch_size * max_seq_len"
grad_accum_steps = total_batch_size // (device_batch_size * max_seq_len)
tokens_per_step = total_batch_size

dense_config = config_from_depth(depth, vocab_size=vocab_size, sequence_len=max_seq_len)
expert_hidden = 4 * dense_config.n_embd // (experts_per_token + int(shared_expert))
moe_config = config_from_depth(depth, vocab_size=vocab_size, sequence_len=max_seq_len, n_experts=n_experts,
                               experts_per_token=experts_per_token, shared_expert=shared_expert,
                               expert_hidden=expert_hidden, moe_aux_loss_coef=moe_aux_loss_coef)


def make(config):
    seed_everything(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model, model.setup_optimizers()


assert dispatch in ("loop", "bmm", "both"), f"--dispatch must be loop, bmm or both, got {dispatch!r}"
models = {"dense": make(dense_config)}  # name -> (model, optimizers); MoE names are their dispatch
for way in (["loop", "bmm"] if dispatch == "both" else [dispatch]):
    models[way] = make(moe_config)
moe_names = [name for name in models if name != "dense"]
for name, (model, _) in list(models.items())[:2]:
    print(f"{'dense' if name == 'dense' else 'moe':5s}: params {model.num_params():,} | active {model.num_active_params():,} | "
          f"FLOPs/token {model.estimate_flops():.3e}")
print(f"MoE: {n_experts} experts, top-{experts_per_token}{' + shared' if shared_expert else ''}, expert hidden "
      f"{expert_hidden} | depth {depth} width {dense_config.n_embd} | {tokens_per_step} tokens/step "
      f"({grad_accum_steps} x {device_batch_size} x {max_seq_len}) | "
      f"{steps} steps | {torch.get_num_threads()} threads")

train_batches = data_loader(device_batch_size, max_seq_len, "train", tokenizer, device)
seconds = {name: 0.0 for name in models}
cpu_seconds = {name: 0.0 for name in models}
optimizer_cpu_seconds = {name: 0.0 for name in models}
bucket_rows, assignments = 0, 0  # rows the expert matmuls ran over vs assignments they served
last_loss = {}
for step in range(steps):
    micro_batches = [next(train_batches)[:2] for _ in range(grad_accum_steps)]
    names = list(models)
    for name in names[step % len(names):] + names[:step % len(names)]:  # take turns at going first
        model, optimizers = models[name]
        gpt.MOE_DISPATCH = name if name != "dense" else "auto"
        t0, c0 = time.perf_counter(), time.process_time()
        total = 0.0
        for x, y in micro_batches:
            with autocast:
                loss = model(x, y)
            (loss / grad_accum_steps).backward()
            total += loss.item() / grad_accum_steps  # syncs the device: the timing is honest
        c1 = time.process_time()
        set_schedule(optimizers, lr_multiplier(step, steps, 0.0, 0.4, 0.0), step)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        last_loss[name] = total
        if step >= warmup_steps:
            seconds[name] += time.perf_counter() - t0
            cpu_seconds[name] += time.process_time() - c0
            optimizer_cpu_seconds[name] += time.process_time() - c1
    for moe in models[moe_names[0]][0].moe_layers():
        bucket_rows += moe.n_experts * int(moe.load.max())
        assignments += int(moe.load.sum())
    if step % 5 == 0 or step == steps - 1:
        aux = models[moe_names[0]][0].moe_aux_loss.item()
        print(f"step {step + 1:4d}/{steps} | loss " + " ".join(f"{n} {v:.4f}" for n, v in last_loss.items())
              + f" | moe aux {aux:.3f}")

timed = max(1, steps - warmup_steps) * tokens_per_step
print()
print(f"expert buckets of bmm: {bucket_rows / assignments:.2f}x the rows routed (padding to the busiest expert's load)")
for label, secs in [("wall", seconds), ("CPU time", cpu_seconds)]:
    tps = {name: timed / max(s, 1e-9) for name, s in secs.items()}
    print(f"training tok/s ({label}): dense {tps['dense']:,.0f} | " + " | ".join(
        f"moe ({n}) {tps[n]:,.0f}, ratio moe/dense {tps[n] / tps['dense']:.2f}x" for n in moe_names))
n_timed = max(1, steps - warmup_steps)
fwd_bwd = {name: timed / max(cpu_seconds[name] - optimizer_cpu_seconds[name], 1e-9) for name in models}
print(f"forward+backward only tok/s (CPU time): dense {fwd_bwd['dense']:,.0f} | " + " | ".join(
    f"moe ({n}) {fwd_bwd[n]:,.0f}, ratio {fwd_bwd[n] / fwd_bwd['dense']:.2f}x" for n in moe_names))
print("optimizer CPU seconds per step: " + " | ".join(f"{n} {s / n_timed:.2f}" for n, s in optimizer_cpu_seconds.items()))
if eval_tokens > 0:
    eval_steps = max(1, eval_tokens // (device_batch_size * max_seq_len))
    bpb = {}
    for name, (model, _) in list(models.items())[:2]:  # the MoE models compute the same function
        gpt.MOE_DISPATCH = name if name != "dense" else "auto"
        model.eval()  # (eval batches: device_batch_size x max_seq_len)
        with autocast:
            bpb[name] = evaluate_bpb(model, data_loader(device_batch_size, max_seq_len, "val", tokenizer, device),
                                     eval_steps, token_bytes)
    print(f"val bpb after {steps} steps ({eval_steps * device_batch_size * max_seq_len:,} val tokens): "
          f"moe {bpb[moe_names[0]]:.4f} | dense {bpb['dense']:.4f}")
