"""
Losses for evaluation. Bits per byte: the model's loss measured against the text's UTF-8 bytes,
so models with different tokenizers (and vocab sizes) compare fairly; special tokens (0 bytes) are
left out. Chat: the mean loss per assistant token (targets -1 elsewhere).
"""
import math
from contextlib import nullcontext

import torch

from nanochat.common import all_reduce_sum


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """
    Sum the per-token loss (nats) over `steps` batches of (inputs, targets[, ...]) and divide
    by the bytes those targets stand for. token_bytes: int tensor, bytes of each token id.
    Under DDP, every rank passes its own batches and all ranks get the global figure.
    """
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    for _ in range(steps):
        inputs, targets = next(batches)[:2]
        loss = model(inputs, targets, loss_reduction="none").view(-1)
        targets = targets.reshape(-1).to(token_bytes.device)
        valid = targets >= 0  # -1 marks ignored positions
        nbytes = torch.where(valid, token_bytes[targets.clamp(min=0)], 0)
        counted = nbytes > 0
        total_nats += loss.to(token_bytes.device).double()[counted].sum()
        total_bytes += nbytes.sum()
    all_reduce_sum(total_nats), all_reduce_sum(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())


def unigram_bpb(train_batches, val_batches, steps, token_bytes):
    """
    The baseline a model must beat: bits per byte on `steps` val batches of a unigram model
    (add-one smoothed token frequencies counted over `steps` train batches).
    """
    counts = torch.zeros(len(token_bytes), dtype=torch.float64)
    for _ in range(steps):
        counts += torch.bincount(next(train_batches)[1].reshape(-1).cpu().clamp(min=0), minlength=len(token_bytes)).double()
    log_probs = torch.log((counts + 1) / (counts.sum() + len(counts)))
    byte_counts = token_bytes.cpu()
    nats, nbytes = 0.0, 0
    for _ in range(steps):
        targets = next(val_batches)[1].reshape(-1).cpu()
        targets = targets[(targets >= 0)]
        targets = targets[byte_counts[targets] > 0]
        nats -= log_probs[targets].sum().item()
        nbytes += byte_counts[targets].sum().item()
    return nats / (math.log(2) * nbytes)



@torch.no_grad()
def evaluate_loss(model, batches, device, autocast=nullcontext()):
    """Mean cross-entropy per trained token (targets >= 0) over all batches and ranks (nan when there is none)."""
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for inputs, targets in batches:
        with autocast:
            total += model(inputs, targets, loss_reduction="sum").double()
        count += (targets >= 0).sum()
    all_reduce_sum(total), all_reduce_sum(count)
    return (total / count).item() if count.item() > 0 else float("nan")
