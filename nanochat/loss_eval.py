"""
Bits per byte: the model's loss measured against the text's UTF-8 bytes, so models with
different tokenizers (and vocab sizes) compare fairly. Special tokens (0 bytes) are left out.
"""
import math

import torch
import torch.distributed as dist


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
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
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
