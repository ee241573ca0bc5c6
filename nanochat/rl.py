"""
Pieces of RL with verifiable rewards (GRPO-style), used by scripts/chat_rl.py.

One step: for each prompt, sample a group of num_samples completions with the engine, score
each with the task's checker, turn the rewards into group-normalised advantages
    A_i = (r_i - mean(r)) / (std(r) + eps)        (std: population std; or no division)
and minimise the token-level clipped policy-gradient loss over the completions' sampled tokens
    L = sum_t [ -min(rho_t A, clip(rho_t, 1-e, 1+e) A) + beta * KL_t ] / (number of sampled tokens)
with rho_t = pi(y_t) / pi_old(y_t) (pi_old: the policy that sampled, before this step's updates)
and KL_t the k3 estimator of KL(pi || pi_ref) against a frozen reference:
    KL_t = exp(q_t) - q_t - 1,  q_t = log pi_ref(y_t) - log pi(y_t)   (>= 0, unbiased, 0 when equal)
Only tokens the model sampled are trained (mask 1 of the engine); tool output the engine forced
into the stream (mask 0), the prompt and padding are not. Every log-prob is the model's own
(temperature 1, no top-k), whatever the sampler's settings.

Also: pass@k (the unbiased estimator of Chen et al. 2021) and a format score for the optional
format bonus.
"""
import re

import torch

from nanochat.engine import Sequence
from nanochat.rows import padded_batch
from nanochat.tasks.common import last_number


# -----------------------------------------------------------------------------
# Advantages, loss, pass@k

def group_advantages(rewards, normalize_std=True, eps=1e-6):
    """rewards (..., G): the last dim is one prompt's group of samples -> advantages, same shape.
    Each group's advantages sum to zero; a group whose rewards are all equal gets zeros (no signal)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    if not normalize_std:
        return centered
    return centered / (rewards.std(dim=-1, keepdim=True, unbiased=False) + eps)


def kl_k3(logp, ref_logp):
    """Per-token k3 estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (>= 0)."""
    q = ref_logp - logp
    return torch.exp(q) - q - 1


def policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2, ref_logp=None, beta=0.0, num_tokens=None):
    """Token-level clipped policy-gradient loss (+ beta * k3 KL), summed over masked tokens and
    divided by num_tokens (default: mask.sum(); pass the whole step's count when the step is
    split into micro-batches or ranks). logp, old_logp, ref_logp, mask: (B, T); advantages: (B,).
    clip_eps <= 0 turns clipping off. Returns (loss, stats) with stats detached floats/tensors:
    pg (the policy term), kl (mean per token), clip_frac (fraction of tokens whose ratio was clipped)."""
    mask = mask.to(logp.dtype)
    n = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    adv = advantages.to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    if clip_eps > 0:
        clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
        surrogate = torch.minimum(unclipped, clipped)
        clip_frac = ((clipped < unclipped).to(mask.dtype) * mask).sum()
    else:
        surrogate, clip_frac = unclipped, torch.zeros((), device=logp.device)
    per_token = -surrogate
    kl_sum = torch.zeros((), device=logp.device)
    if ref_logp is not None and beta > 0:
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + beta * kl
        kl_sum = (kl * mask).sum().detach()
    loss = (per_token * mask).sum() / n
    stats = {"pg": ((-surrogate * mask).sum() / n).detach(), "kl_sum": kl_sum, "clip_sum": clip_frac.detach()}
    return loss, stats


def pass_at_k(n, c, k):
    """Probability that at least one of k samples drawn without replacement from n samples, c of
    them correct, is correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    p_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        p_all_wrong *= 1.0 - k / i
    return 1.0 - p_all_wrong


# -----------------------------------------------------------------------------
# Rollouts: samples from the engine -> training tensors

def sample_groups(engine, prompts, seeds, num_samples, max_tokens, temperature=1.0, top_k=None):
    """num_samples completions of each prompt, all decoded together (sample i of a prompt with seed
    seeds[p] + i) -> per prompt a list of (tokens, masks, finished). Unlike Engine.generate_batch
    the stop token is kept (mask 1): the model is also trained on when to stop. finished: the
    sample ended with a stop token within max_tokens (not cut off)."""
    groups = [[Sequence(prompt, max_tokens, temperature, top_k, seed=seed + i) for i in range(num_samples)]
              for prompt, seed in zip(prompts, seeds)]
    engine.run([s for group in groups for s in group])
    return [[(s.tokens, s.masks, bool(s.tokens) and s.tokens[-1] in engine.stop_ids) for s in group] for group in groups]


def sample_group(engine, prompt, num_samples, max_tokens, temperature=1.0, top_k=None, seed=42):
    """sample_groups for one prompt."""
    return sample_groups(engine, [prompt], [seed], num_samples, max_tokens, temperature, top_k)[0]


def completion_text(tokenizer, tokens, stop_ids):
    """The completion's text without its stop token (what the task's checker reads)."""
    if tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)


def rollout_batch(sequences, pad_id, device="cpu"):
    """sequences: list of (prompt_ids, completion_ids, completion_masks) -> (inputs, targets), both
    (B, L-1) with L the longest prompt + completion. targets[b, t] = ids[t+1] where that token was
    sampled by the model (completion mask 1), else -1 (prompt, forced tool output, padding)."""
    rows = []
    for prompt, completion, masks in sequences:
        assert len(completion) == len(masks), "rollout_batch: one mask per completion token"
        rows.append((list(prompt) + list(completion), [0] * len(prompt) + [int(m == 1) for m in masks]))
    return padded_batch(rows, pad_id, device)


def token_logprobs(model, inputs, targets):
    """log pi(target) at every position (B, T); 0 where the target is -1 (not trained)."""
    return -model(inputs, targets, loss_reduction="none")


# -----------------------------------------------------------------------------
# Rewards

def format_score(conversation, completion, finished):
    """1.0 when the completion ended by itself and gives an answer the checker can read (a number;
    a spelled-out word for spelling tasks), else 0.0. Says nothing about correctness."""
    if not finished:
        return 0.0
    if conversation.get("kind") == "spell":
        return float(bool(re.search(r"[A-Za-z](?:-[A-Za-z])+", completion)))
    return float(last_number(completion) is not None)


def shaped_reward(task, conversation, completion, finished, reward_weight=1.0):
    """reward_weight * correct + (1 - reward_weight) * format_score: reward_weight = 1 is the pure
    verifiable reward; lower values mix in a bonus for a well-formed, finished answer."""
    correct = task.reward(conversation, completion)
    if reward_weight == 1.0:
        return correct
    return reward_weight * correct + (1.0 - reward_weight) * format_score(conversation, completion, finished)
