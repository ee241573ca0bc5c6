"""
The one batching primitive of the conversation stages (SFT, DPO, RL, distillation): rows of
(ids, mask) -> padded (inputs, targets), the targets -1 wherever the mask is 0 (user text, tool
output, padding), so the loss counts only what the model is trained to say.
"""
import torch


def rows_to_batch(rows, T, pad_id, device="cpu"):
    """rows: list of (ids, mask) of at most T+1 tokens -> inputs, targets of shape (len(rows), T)."""
    ids = torch.full((len(rows), T + 1), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T + 1), dtype=torch.bool)
    for r, (row_ids, row_mask) in enumerate(rows):
        ids[r, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        mask[r, :len(row_mask)] = torch.tensor(row_mask, dtype=torch.bool)
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -1)
    return ids[:, :-1].to(device), targets.to(device)


def padded_batch(rows, pad_id, device="cpu"):
    """rows_to_batch padded to the longest row (its length = T + 1)."""
    return rows_to_batch(rows, max(len(ids) for ids, _ in rows) - 1, pad_id, device)
