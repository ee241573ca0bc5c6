"""
Direct Preference Optimization (Rafailov et al. 2023) on {"prompt", "chosen", "rejected"} pairs.

The policy pi starts as a copy of the reference ref (the SFT model, frozen). For a pair with
chosen response y_c and rejected y_r to the same prompt x, the implicit reward of a response is
beta * (log pi(y|x) - log ref(y|x)) and the loss is

    -log sigmoid(reward_c - reward_r)

which is log 2 at the start (pi == ref) and falls as the policy raises the chosen response's
probability relative to the rejected one's. log pi(y|x) is the sum of the log-probs of the
response tokens only: the final assistant turn (mask from render_conversation, so tool output
is excluded too); the prompt, and any earlier turns, are identical in both and are not counted.

Batches hold the chosen rows of B pairs, then their rejected rows (2B rows, padded to the longest);
targets are -1 outside the response, so model(inputs, targets, loss_reduction="none") gives the
per-token losses to sum. The reference log-probs need no gradient: they can be computed once for
the whole data set before training (no second model in memory), see scripts/chat_dpo.py.
"""
import torch
import torch.nn.functional as F

from nanochat.common import all_reduce_sum
from nanochat.rows import padded_batch


def response_only(tokenizer, ids, mask):
    """The mask restricted to the final assistant turn (tokens after the last <|assistant_start|>)."""
    start = tokenizer.encode_special("<|assistant_start|>")
    last = max((i for i, t in enumerate(ids) if t == start), default=len(ids))
    return [m if i > last else 0 for i, m in enumerate(mask)]


def render_pair(tokenizer, pair, T):
    """((chosen_ids, chosen_mask), (rejected_ids, rejected_mask)), each at most T+1 tokens with the
    mask on the final response only; None when a response is cut off entirely by the truncation or
    both sides render the same (such a pair has no gradient)."""
    rows = []
    for side in ("chosen", "rejected"):
        ids, mask = tokenizer.render_conversation(pair[side], max_tokens=T + 1)
        mask = response_only(tokenizer, ids, mask)
        if not any(mask[1:]):
            return None
        rows.append((ids, mask))
    if rows[0] == rows[1]:
        return None
    return rows[0], rows[1]


def pair_length(rendered_pair):
    return max(len(rendered_pair[0][0]), len(rendered_pair[1][0]))


def pairs_to_batch(rendered, pad_id, device="cpu"):
    """rendered: list of N render_pair results -> inputs, targets of shape (2N, L): the N chosen rows
    then the N rejected rows, padded to the longest (L + 1 = its length)."""
    return padded_batch([r[0] for r in rendered] + [r[1] for r in rendered], pad_id, device)


def sequence_logps(model, inputs, targets):
    """Sum of log p(target) over the response tokens (targets >= 0) of each row: shape (rows,)."""
    token_losses = model(inputs, targets, loss_reduction="none")  # cross-entropy, 0 where ignored
    return -token_losses.float().sum(dim=-1)


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """Per-pair DPO losses and the implicit rewards beta * (log pi - log ref) of both sides."""
    chosen_rewards = beta * (pi_chosen - ref_chosen)
    rejected_rewards = beta * (pi_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def pair_stats(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """Sums over the pairs (so ranks and batches add up): loss, reward margin, reward accuracy
    (chosen reward > rejected; a tie counts half, so the start is exactly 50%), log-prob accuracy
    (the policy itself gives the chosen response the higher log-prob), and the count."""
    losses, rc, rr = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta)
    margin = rc - rr
    return {"loss": losses.detach().sum().item(), "margin": margin.sum().item(),
            "reward_acc": ((margin > 0).float() + 0.5 * (margin == 0).float()).sum().item(),
            "logp_acc": (pi_chosen > pi_rejected).float().sum().item(),
            "chosen_reward": rc.sum().item(), "rejected_reward": rr.sum().item(), "pairs": float(len(margin))}


def mean_stats(sums):
    """pair_stats sums -> means (accuracies as fractions)."""
    n = max(sums["pairs"], 1.0)
    return {k: v / n for k, v in sums.items() if k != "pairs"}


@torch.no_grad()
def compute_logps(model, rendered, batch_size, pad_id, device, autocast=None, indices=None):
    """(N, 2) tensor of [chosen, rejected] response log-probs for every pair in `rendered` under
    `model` (no gradient). With `indices`, only those rows are computed (others stay 0): each DDP
    rank does its share and all-reduce(SUM) of the results gives every rank the whole table."""
    from contextlib import nullcontext
    autocast = autocast or nullcontext()
    indices = list(range(len(rendered))) if indices is None else list(indices)
    indices.sort(key=lambda i: pair_length(rendered[i]))  # similar lengths together: less padding
    out = torch.zeros(len(rendered), 2, dtype=torch.float32, device=device)
    for s in range(0, len(indices), batch_size):
        chunk = indices[s:s + batch_size]
        inputs, targets = pairs_to_batch([rendered[i] for i in chunk], pad_id, device)
        with autocast:
            logps = sequence_logps(model, inputs, targets)
        out[chunk, 0], out[chunk, 1] = logps[:len(chunk)], logps[len(chunk):]
    return out


def shard_indices(n, rank, world_size):
    return range(rank, n, world_size)


@torch.no_grad()
def evaluate_pairs(model, rendered, ref_logps, beta, batch_size, pad_id, device, autocast=None, groups=None,
                   rank=0, world_size=1):
    """Held-out preference metrics (means over all pairs and ranks): {"all": stats, <group>: stats}.
    groups: a name per pair (e.g. its source task) for per-source numbers; ref_logps: (N, 2)."""
    logps = compute_logps(model, rendered, batch_size, pad_id, device, autocast,
                          indices=shard_indices(len(rendered), rank, world_size))
    all_reduce_sum(logps)
    ref_logps = ref_logps.to(logps.device)
    result = {"all": mean_stats(pair_stats(logps[:, 0], logps[:, 1], ref_logps[:, 0], ref_logps[:, 1], beta))}
    for name in sorted(set(groups or [])):
        sel = torch.tensor([g == name for g in groups], device=logps.device)
        result[name] = mean_stats(pair_stats(logps[sel, 0], logps[sel, 1], ref_logps[sel, 0], ref_logps[sel, 1], beta))
    return result
