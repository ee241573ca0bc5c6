"""
Benchmark: our training step against a plain fp32 nanoGPT-style GPT (learned positions,
LayerNorm, GELU, tied embeddings, torch.optim.AdamW with warm-up + cosine), same width,
depth, heads, batch, data and tokenizer, in one run.

Prints (1) training tok/s of each and the ratio, and (2) wall-clock training time (evals
excluded) to first reach a fixed val bits-per-byte, and the ratio. By default the target is
the baseline's own final val bpb, so the baseline needs its whole budget by construction;
pass --target_bpb=X for a fixed number.

    python -m scripts.bench_train                       # CPU: depth 4, 256-token context
    python -m scripts.bench_train --depth=12 --max_seq_len=1024 --device_batch_size=32   # GPU
"""
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import math
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import autodetect_device_type, compute_dtype, get_peak_flops, seed_everything
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
device_batch_size = 16
num_steps = 400               # the budget of each model
eval_every = 25
eval_tokens = 65536
target_bpb = 0.0              # 0: the baseline's final val bpb
baseline_lr = 1e-3            # nanoGPT's small-model AdamW settings
baseline_warmup = 40
baseline_weight_decay = 0.1
compile_ours = False          # our step under torch.compile (always on CUDA)
seed = 1337
user_config = configure(globals())
# -----------------------------------------------------------------------------


class BaselineBlock(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.c_attn, self.attn_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.c_fc, self.mlp_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class BaselineGPT(nn.Module):
    """nanoGPT's model, written plainly: the peer our architecture and optimizers must beat."""

    def __init__(self, vocab_size, sequence_len, n_layer, n_embd, n_head):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(sequence_len, n_embd)
        self.blocks = nn.ModuleList(BaselineBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets=None, loss_reduction="mean"):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x)).float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)


def train(name, model, step_fn, train_batches, val_batches_fn, token_bytes, tokens_per_step):
    """Run num_steps steps; returns tok/s (training only) and [(train_seconds, step, val_bpb)]."""
    curve, train_seconds, timed_tokens, timed_seconds = [], 0.0, 0, 0.0
    for step in range(num_steps + 1):
        if step % eval_every == 0 or step == num_steps:
            model.eval()
            with autocast:
                bpb = evaluate_bpb(model, val_batches_fn(), eval_steps, token_bytes)
            model.train()
            curve.append((train_seconds, step, bpb))
            print(f"  {name:8s} step {step:4d} | train {train_seconds:7.1f}s | val bpb {bpb:.4f}", flush=True)
        if step == num_steps:
            break
        x, y, _ = next(train_batches)
        t0 = time.time()
        step_fn(step, x, y)
        dt = time.time() - t0
        train_seconds += dt
        if step >= 5:  # skip warm-up (allocator, compile)
            timed_tokens += tokens_per_step
            timed_seconds += dt
    return timed_tokens / timed_seconds, curve


def time_to_target(curve, target):
    for seconds, step, bpb in curve:
        if bpb <= target:
            return seconds, step
    return None, None


device_type = device_type or autodetect_device_type()
device = torch.device(device_type)
dtype = compute_dtype(device_type)
autocast = torch.amp.autocast(device_type=device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
tokenizer = get_tokenizer()
token_bytes = get_token_bytes(device=device)
vocab_size = tokenizer.get_vocab_size()
tokens_per_step = device_batch_size * max_seq_len
eval_steps = max(1, eval_tokens // tokens_per_step)
config = config_from_depth(depth, vocab_size=vocab_size, sequence_len=max_seq_len)


def batches(split):
    return data_loader(device_batch_size, max_seq_len, split, tokenizer, device)


# --- ours: the nanochat GPT with Muon + AdamW and the base_train schedule
seed_everything(seed)
with torch.device("meta"):
    ours = GPT(config)
ours.to_empty(device=device)
ours.init_weights()
ours_optimizers = ours.setup_optimizers()
ours_forward = torch.compile(ours) if (compile_ours or device_type == "cuda") else ours


def ours_step(step, x, y):
    with autocast:
        loss = ours_forward(x, y)
    loss.backward()
    set_schedule(ours_optimizers, lr_multiplier(step, num_steps, 0.0, 0.4, 0.0), step)
    for opt in ours_optimizers:
        opt.step()
    ours.zero_grad(set_to_none=True)
    return loss.item()


# --- baseline: nanoGPT, fp32, torch.optim.AdamW, warm-up + cosine to 10%
seed_everything(seed)
base = BaselineGPT(vocab_size, max_seq_len, config.n_layer, config.n_embd, config.n_head).to(device)
decay = [p for p in base.parameters() if p.dim() >= 2]
no_decay = [p for p in base.parameters() if p.dim() < 2]
base_opt = torch.optim.AdamW([{"params": decay, "weight_decay": baseline_weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=baseline_lr, betas=(0.9, 0.95))


def base_step(step, x, y):
    loss = base(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0)
    progress = max(0.0, (step - baseline_warmup) / max(1, num_steps - baseline_warmup))
    lr = baseline_lr * (step + 1) / baseline_warmup if step < baseline_warmup else \
        baseline_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in base_opt.param_groups:
        group["lr"] = lr
    base_opt.step()
    base_opt.zero_grad(set_to_none=True)
    return loss.item()


n_ours = sum(p.numel() for p in ours.parameters())
n_base = sum(p.numel() for p in base.parameters())
print(f"device {device_type} | depth {depth} width {config.n_embd} heads {config.n_head} | seq {max_seq_len} | "
      f"batch {tokens_per_step} tokens | vocab {vocab_size} | params ours {n_ours:,} baseline {n_base:,} (tied)")
print("baseline (nanoGPT, fp32, AdamW):")
base_tps, base_curve = train("baseline", base, base_step, batches("train"), lambda: batches("val"), token_bytes, tokens_per_step)
print("ours (nanochat GPT, Muon + AdamW):")
ours_tps, ours_curve = train("ours", ours, ours_step, batches("train"), lambda: batches("val"), token_bytes, tokens_per_step)

target = target_bpb or base_curve[-1][2]
t_base, s_base = time_to_target(base_curve, target)
t_ours, s_ours = time_to_target(ours_curve, target)
print()
print(f"training tok/s: ours {ours_tps:,.0f} | baseline {base_tps:,.0f} | ratio {ours_tps / base_tps:.2f}x")
peak = get_peak_flops(device)
if peak:
    print(f"MFU: ours {ours.estimate_flops() * ours_tps / peak:.1%}")
print(f"final val bpb after {num_steps} steps: ours {ours_curve[-1][2]:.4f} | baseline {base_curve[-1][2]:.4f}")
if t_base is None or t_ours is None:
    print(f"time to val bpb {target:.4f}: ours {t_ours} | baseline {t_base} (not reached within {num_steps} steps)")
else:
    print(f"time to val bpb {target:.4f}: ours {t_ours:.1f}s (step {s_ours}) | baseline {t_base:.1f}s (step {s_base}) | "
          f"ratio {t_base / max(t_ours, 1e-9):.2f}x shorter")
