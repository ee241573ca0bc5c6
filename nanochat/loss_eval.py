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


def unigram_bpb(token_counts, eval_tokens, token_bytes):
    """
    The baseline a model must beat: bits per byte of a unigram model (add-one smoothed
    token frequencies from training data) on eval tokens. All arguments are 1-D tensors.
    """
    probs = (token_counts.double() + 1) / (token_counts.double().sum() + len(token_counts))
    nbytes = token_bytes[eval_tokens]
    counted = nbytes > 0
    nats = -torch.log(probs[eval_tokens[counted]]).sum().item()
    return nats / (math.log(2) * nbytes.sum().item())
