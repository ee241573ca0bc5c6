"""
Low-rank adapters (LoRA): train a small update B @ A next to frozen nn.Linear weights.

    y = x W^T + (alpha / rank) * (x A^T) B^T        A: (rank, in), B: (out, rank), B = 0 at start

so a fresh adapter leaves the model's outputs unchanged. Only A and B are trained (every other
parameter is frozen), and only they are saved: for a rank-16 adapter on a few projections that
is ~2% of the checkpoint. Later the update is merged into W for inference (no extra cost).

    lora.apply_lora(model, rank=16, alpha=32, targets="attn.c_q,attn.c_v,mlp.c_fc")
    ... train ...
    lora.save_adapter(path, model, base_meta)                    # the adapter alone, atomic
    model, meta = lora.load_merged(checkpoint_dir, step, path, device)   # base + adapter, merged

Targets are comma-separated patterns matched (fnmatch) against the end of each nn.Linear's
qualified name: "attn.c_q" matches transformer.h.<i>.attn.c_q in every block, "h.0.*" all of
block 0. lm_head cannot be a target: the CPU loss reads lm_head.weight directly (gpt.py's
ChunkedSoftcapCrossEntropy), so an adapter there would be silently ignored in training.

The adapter file (torch.save, loadable with weights_only=True) records its rank, alpha, the
adapted module names and the base checkpoint's identity (dir, step, model_config and the
sha256 of its model file from the checkpoint's meta), so loading it onto another model is a
clear error instead of silent garbage.
"""
import fnmatch
import math
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import atomic_open, is_distributed

FORMAT = "nanochat-lora-1"
DEFAULT_TARGETS = "attn.c_q,attn.c_v,mlp.c_fc"


class LoRAError(RuntimeError):
    """An adapter file is unreadable or does not fit the model / base checkpoint; the message says why."""


class LoRALinear(nn.Linear):
    """nn.Linear with a frozen weight plus a trainable low-rank update. The weight keeps its name
    (and the Parameter object), so code that reads module.weight still sees the base weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)  # no fresh weight: reuse the base's
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.enabled = True  # False: behave as the base layer (the DPO reference without a copy)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear inits its weight

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def delta(self):
        """The update to W, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def parse_targets(targets) -> list[str]:
    patterns = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if not patterns:
        raise LoRAError("lora_targets is empty: name at least one linear layer, e.g. attn.c_q,attn.c_v")
    return patterns


def _matches(name, pattern):
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=DEFAULT_TARGETS) -> list[str]:
    """Freeze every parameter of `model`, then put a LoRA adapter on each nn.Linear matching
    `targets` (in place). Returns the adapted modules' names, in model order."""
    if rank < 1:
        raise LoRAError(f"lora rank must be >= 1, got {rank}")
    patterns = parse_targets(targets)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [(name, m) for name, m in linears if any(_matches(name, p) for p in patterns)]
    if any(isinstance(m, LoRALinear) for _, m in linears):
        raise LoRAError("apply_lora: the model already has LoRA adapters")
    for name, _ in chosen:
        if name.split(".")[-1] == "lm_head":
            raise LoRAError("lora target 'lm_head' is not supported: the CPU loss reads lm_head.weight directly; "
                            "adapt the blocks' projections instead")
    unused = [p for p in patterns if not any(_matches(name, p) for name, _ in linears)]
    if unused:
        names = sorted({".".join(n.split(".")[-2:]) for n, _ in linears})
        raise LoRAError(f"lora targets {unused} match no linear layer; the model has: {', '.join(names)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha))
    return [name for name, _ in chosen]


def lora_modules(model: nn.Module):
    """(name, LoRALinear) pairs of the model, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module):
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model: nn.Module) -> dict:
    """Only the adapters: {"<module>.lora_A": tensor, "<module>.lora_B": tensor, ...} (on CPU)."""
    state = {}
    for name, m in lora_modules(model):
        state[f"{name}.lora_A"] = m.lora_A.detach().cpu().clone()
        state[f"{name}.lora_B"] = m.lora_B.detach().cpu().clone()
    return state


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict:
    """The model's state dict with every adapter folded into its weight and no lora keys: the
    keys and shapes of the base model, so checkpoint_manager.build_model loads it as is."""
    state = model.state_dict()
    for name, m in lora_modules(model):
        state[f"{name}.weight"] = (m.weight + m.delta().to(m.weight.dtype)).detach()
        del state[f"{name}.lora_A"], state[f"{name}.lora_B"]
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put plain nn.Linear layers back (in place).
    The model then runs at the base model's speed and has its state-dict keys."""
    for name, m in lora_modules(model):
        m.weight += m.delta().to(m.weight.dtype)
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model


@contextmanager
def disabled(model: nn.Module):
    """Run the model as its base (adapters off), e.g. for DPO reference log-probs without a copy."""
    modules = [m for _, m in lora_modules(model)]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True


# -----------------------------------------------------------------------------
# Adapter files

def base_identity(meta: dict) -> dict:
    """What an adapter records about its base checkpoint (from checkpoint_manager's meta)."""
    model_file = os.path.basename(meta.get("checkpoint_file") or f"model_{meta['step']:06d}.pt")
    record = meta.get("files", {}).get(model_file, {})
    return {"checkpoint_dir": os.path.dirname(meta["checkpoint_file"]) if meta.get("checkpoint_file") else None,
            "step": meta.get("step"), "model_config": dict(meta["model_config"]),
            "model_sha256": record.get("sha256")}


def save_adapter(path: str, model: nn.Module, base_meta: dict, extra: dict | None = None) -> dict:
    """Write the adapters alone (atomic: temp file, fsync, rename); rank 0 only under DDP.
    base_meta: the meta of the checkpoint the adapters were trained on (load_checkpoint/build_model)."""
    modules = lora_modules(model)
    if not modules:
        raise LoRAError("save_adapter: the model has no LoRA adapters")
    first = modules[0][1]
    payload = {"format": FORMAT, "rank": first.rank, "alpha": first.alpha, "modules": [n for n, _ in modules],
               "base": base_identity(base_meta), "extra": dict(extra or {}), "state": lora_state_dict(model)}
    if is_distributed() and dist.get_rank() != 0:
        return payload
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)
    return payload


def read_adapter(path: str) -> dict:
    """The adapter file's contents, checked for shape; LoRAError naming the file otherwise."""
    if not os.path.exists(path):
        raise LoRAError(f"{path}: no such adapter file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoRAError(f"{path}: not a readable adapter file (truncated or corrupt?): {type(e).__name__}: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise LoRAError(f"{path}: not a nanochat LoRA adapter (format {payload.get('format') if isinstance(payload, dict) else None!r}, "
                        f"expected {FORMAT!r})")
    for key in ("rank", "alpha", "modules", "base", "state"):
        if key not in payload:
            raise LoRAError(f"{path}: adapter file has no {key!r} field")
    return payload


def check_base(payload: dict, base_meta: dict, path: str = "adapter", allow_other_base: bool = False):
    """Raise LoRAError when the adapter was trained on a different base model."""
    want, have = payload["base"], base_identity(base_meta)
    where = base_meta.get("checkpoint_file") or "the base checkpoint"
    for key, value in want["model_config"].items():
        if have["model_config"].get(key) != value:
            raise LoRAError(f"{path}: adapter was trained on a model with {key}={value!r}, but {where} has "
                            f"{key}={have['model_config'].get(key)!r}")
    if not allow_other_base and want.get("model_sha256") and have.get("model_sha256") != want["model_sha256"]:
        raise LoRAError(f"{path}: adapter was trained on {want.get('checkpoint_dir')} step {want.get('step')} "
                        f"(model sha256 {want['model_sha256'][:12]}...), not on {where} "
                        f"(sha256 {str(have.get('model_sha256'))[:12]}...); pass allow_other_base=True to load it anyway")


def load_adapter(model: nn.Module, path: str, base_meta: dict | None = None, allow_other_base: bool = False) -> dict:
    """Put the adapter of `path` on `model` (adapters are created if the model has none).
    With base_meta, first check that the adapter belongs to that base checkpoint. Returns the payload."""
    payload = read_adapter(path)
    if base_meta is not None:
        check_base(payload, base_meta, path, allow_other_base)
    if not lora_modules(model):
        missing = [n for n in payload["modules"] if n not in dict(model.named_modules())]
        if missing:
            raise LoRAError(f"{path}: adapted modules {missing[:3]} do not exist in this model")
        apply_lora(model, payload["rank"], payload["alpha"], targets=[n for n in payload["modules"]])
    names = [n for n, _ in lora_modules(model)]
    first = lora_modules(model)[0][1]
    if (first.rank, first.alpha) != (payload["rank"], payload["alpha"]):
        raise LoRAError(f"{path}: adapter has rank {payload['rank']} alpha {payload['alpha']}, the model's adapters "
                        f"rank {first.rank} alpha {first.alpha}")
    if names != list(payload["modules"]):
        raise LoRAError(f"{path}: adapter covers modules {payload['modules'][:3]}..., the model's adapters are {names[:3]}...")
    modules = dict(lora_modules(model))
    for name in names:
        m = modules[name]
        for part in ("lora_A", "lora_B"):
            t = payload["state"].get(f"{name}.{part}")
            if t is None or t.shape != getattr(m, part).shape:
                raise LoRAError(f"{path}: {name}.{part} is missing or has shape "
                                f"{None if t is None else tuple(t.shape)}, expected {tuple(getattr(m, part).shape)}")
            with torch.no_grad():
                getattr(m, part).copy_(t)
    return payload


def load_merged(checkpoint_dir: str, step, adapter_path: str, device, allow_other_base: bool = False):
    """Base checkpoint (dir, step; step None = newest) + adapter file, merged: (model, meta) ready for
    inference (Engine, chat_cli, chat_eval). LoRAError when the adapter belongs to another base."""
    from nanochat.checkpoint_manager import build_model, find_last_step  # lazy: lora works without checkpoints
    step = find_last_step(checkpoint_dir) if step is None else step
    model, meta = build_model(checkpoint_dir, step, device, phase="eval")
    load_adapter(model, adapter_path, base_meta=meta, allow_other_base=allow_other_base)
    return merge_lora(model), meta


# -----------------------------------------------------------------------------
# Training pieces shared by chat_sft (via chat_data.finetune) and chat_dpo

def adapter_path(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"adapter_{step:06d}.pt")


def checkpoint_state(model: nn.Module, checkpoint_dir: str, step: int, base_meta: dict, stage: str, rank: int,
                     alpha: float, targets, master: bool):
    """What a LoRA run's checkpoint holds -> (the merged state dict, the meta's "lora" entry). Rank 0
    writes the adapter file now, before the checkpoint: a complete checkpoint (meta written last)
    always has its adapter."""
    path = adapter_path(checkpoint_dir, step)
    if master:
        save_adapter(path, model, base_meta, extra={"stage": stage, "step": step})
    entry = {"rank": rank, "alpha": alpha, "targets": targets, "adapter": os.path.basename(path)}
    return merged_state_dict(model), entry


def prune_adapters(checkpoint_dir: str, keep_steps):
    """Delete adapter files of steps that are no longer kept (checkpoint_manager prunes the rest)."""
    keep = {adapter_path(checkpoint_dir, s) for s in keep_steps}
    for name in os.listdir(checkpoint_dir):
        path = os.path.join(checkpoint_dir, name)
        if name.startswith("adapter_") and name.endswith(".pt") and path not in keep:
            os.unlink(path)


def setup_optimizers(model: nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999)):
    """[AdamW over the adapters only] (the sharded DistAdamW under DDP); each group records initial_lr.
    The training loops treat it like GPT.setup_optimizers' list."""
    from nanochat.adamw import AdamW, DistAdamW
    params = lora_parameters(model)
    if not params:
        raise LoRAError("setup_optimizers: the model has no LoRA adapters")
    opt = (DistAdamW if is_distributed() else AdamW)([dict(params=params, lr=lr)], betas=betas, eps=1e-8,
                                                 weight_decay=weight_decay)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return [opt]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
