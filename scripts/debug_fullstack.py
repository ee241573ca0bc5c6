"""
Look inside the whole stack on one batch, for learners: what the model sees, what it is
trained on, what one optimizer step does, and what it says afterwards.

    python -m scripts.debug_fullstack --mode=pretrain --depth=2 --prompt="The sky is"
    python -m scripts.debug_fullstack --mode=sft --prompt="你好，你是谁？"
    python -m scripts.debug_fullstack --mode=dpo
    python -m scripts.debug_fullstack --mode=sft --checkpoint=chatsft_checkpoints/latest --show_tokens=200

Sections, in order:
  1. setup       mode, device, tokenizer, where the model comes from
  2. model       config, parameter count, every parameter's shape and optimizer
  3. batch       the first batch of the mode (pretrain: nanochat/dataloader.py on the corpus;
                 sft: nanochat/chat_data.py on chat_sft's mixture; dpo: preference pairs), its
                 tensors' shapes and dtypes, and per shown row: the raw text, the token ids
                 next to their pieces with the loss mask, and a compact view of the mask
  4. step        loss before, gradient norms (global, per optimizer group, per parameter),
                 ONE step of the model's optimizers (Muon + AdamW), loss after on the same batch
  5. generate    the Engine's continuation of --prompt (pretrain: raw text; sft/dpo: a chat turn)

A fresh model of --depth is built unless --checkpoint names one (a checkpoint argument as in the
other scripts, e.g. mid_checkpoints/d4 or chatsft_checkpoints/latest). Nothing is written to disk.
"""
import os
import sys

if __package__ in (None, ""):  # also runnable as `python scripts/debug_fullstack.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses
import json
import math
import unicodedata

import torch

from nanochat.checkpoint_manager import CheckpointError, load_model
from nanochat.common import autocast_for, compute_dtype, compute_init, seed_everything
from nanochat.configurator import configure
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import get_tokenizer

# ----------------------------------------------------------------------------- defaults
mode = "pretrain"              # pretrain | sft | dpo
depth = 2                      # fresh model: width = 64 * depth (ignored with --checkpoint)
checkpoint = ""                # a checkpoint to load instead (e.g. chatsft_checkpoints/latest); empty: fresh model
device_type = ""               # cuda | mps | cpu; empty: autodetect
max_seq_len = 128              # T: tokens per row
device_batch_size = 2          # B: rows (pretrain, sft) or preference pairs (dpo)
seed = 42
# data
data_dir = ""                  # pretrain corpus; default: <base>/base_data
generated_examples = 200       # sft: arithmetic and spelling problems each (chat_sft's mix, smaller); dpo: arithmetic pairs
identity_examples = 50         # sft mixture: who-are-you conversations (EN + ZH)
chitchat_examples = 0          # sft mixture: a slice of chitchat-dataset (needs its cached archive)
data_path = ""                 # sft: your conversations (MiniMind JSONL), added to the mixture;
                               # dpo: your preference pairs ({"prompt","chosen","rejected"} JSONL), used alone
pack = False                   # sft: pack several conversations per row (mid_train) or one per row (chat_sft)
beta = 0.1                     # dpo: how far the policy may move from the reference (see nanochat/dpo.py)
# the optimizer step: the pretraining learning rates
embedding_lr = 0.2
unembedding_lr = 0.004
matrix_lr = 0.02
weight_decay = 0.0
grad_clip = 1.0                # 0 disables clipping
lr_frac = 1.0                  # times all the lrs above (chat_sft / chat_dpo start from init_lr_frac = 0.02)
# what to show
show_rows = 1                  # rows printed in detail (dpo: pairs, each as its chosen and rejected row)
show_tokens = 96               # token-table lines per row (the compact views show the whole row)
# generation
prompt = "Why is the sky blue?"
max_tokens = 32
temperature = 0.0              # 0: greedy
top_k = 0                      # 0: off
user_config = configure(globals())
# -----------------------------------------------------------------------------

if mode not in ("pretrain", "sft", "dpo"):
    raise SystemExit(f"--mode must be pretrain, sft or dpo, got {mode!r}")
try:  # a terminal that cannot show a character gets an escape, not a crash
    sys.stdout.reconfigure(errors="backslashreplace")
except AttributeError:
    pass


def section(title):
    print(f"\n{'=' * 24} {title} {'=' * max(3, 70 - len(title))}", flush=True)


def pad(text, width):
    """Left-align to a terminal width: CJK characters take two columns."""
    cols = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return text + " " * max(0, width - cols)


def describe(name, t):
    return f"{name:<14} shape {tuple(t.shape)}  dtype {t.dtype}  device {t.device}"


# ----------------------------------------------------------------------------- 1. setup
section("1. setup")
_, _, _, _, device = compute_init(device_type)
seed_everything(seed)
dtype = compute_dtype(device.type)
autocast = autocast_for(device)
tokenizer = get_tokenizer()
vocab_size = tokenizer.get_vocab_size()
special_ids = {tokenizer.encode_special(name): name for name in tokenizer.get_special_tokens()}
token_bytes = {rank: b for b, rank in tokenizer.get_mergeable_ranks()}
print(f"mode: {mode} | device: {device} | compute dtype: {dtype}")
print(f"tokenizer: vocab {vocab_size:,} ({len(special_ids)} special tokens: {', '.join(special_ids.values())})")

if checkpoint:
    default_stage = {"pretrain": "base", "sft": "mid", "dpo": "chatsft"}[mode]
    try:
        model, meta, checkpoint_dir, step = load_model(checkpoint, device, tokenizer, default_stage, phase="train")
    except CheckpointError as e:
        raise SystemExit(f"debug_fullstack: {e}") from None
    print(f"model: loaded {checkpoint_dir} step {step}")
else:
    model_config = config_from_depth(depth, vocab_size=vocab_size, sequence_len=max_seq_len)
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()
    model.train()
    print(f"model: fresh, randomly initialised, depth {depth} (seed {seed})")
T = max_seq_len
B = device_batch_size

# ----------------------------------------------------------------------------- 2. model
section("2. model")
optimizers = model.setup_optimizers(unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                                    matrix_lr=matrix_lr, weight_decay=weight_decay)
for opt in optimizers:  # as the fine-tuning scripts do: a fraction of the pretraining learning rates
    for group in opt.param_groups:
        group["lr"] *= lr_frac
names = {id(p): n for n, p in model.named_parameters()}
groups = []        # (label, lr, [parameter names]) per optimizer param group
optimizer_of = {}  # parameter name -> "AdamW[0]", "Muon[0]", ...
for opt in optimizers:
    for i, group in enumerate(opt.param_groups):
        tag = f"{type(opt).__name__}[{i}]"
        params = [names[id(p)] for p in group["params"]]
        optimizer_of.update((n, tag) for n in params)
        kind = "matrices" if all(p.ndim >= 2 for p in group["params"]) else "tensors"
        groups.append((f"{tag} " + (params[0] if len(params) == 1 else f"{len(params)} {kind}"), group["lr"], params))
print(f"config: {json.dumps(dataclasses.asdict(model.config))}")
print(f"parameters: {model.num_params():,} in all, {model.num_params(exclude_embedding=True):,} without the "
      f"token embedding | FLOPs per token (train): {model.estimate_flops():.3e}")
print(f"{'name':<34} {'shape':<16} {'numel':>10}  {'dtype':<14} optimizer")
for n, p in model.named_parameters():
    print(f"{n:<34} {str(tuple(p.shape)):<16} {p.numel():>10,}  {str(p.dtype):<14} {optimizer_of[n]}")
print("optimizer groups:")
for label, lr, params in groups:
    print(f"  {label:<44} lr {lr:.5g}")


# ----------------------------------------------------------------------------- 3. batch
def piece(token_id):
    """A token as text: special tokens by name, text in quotes, a partial UTF-8 character as its bytes."""
    if token_id < 0:
        return "(none)"
    if token_id in special_ids:
        return special_ids[token_id]
    raw = token_bytes[token_id]
    try:
        return json.dumps(raw.decode("utf-8"), ensure_ascii=False)
    except UnicodeDecodeError:
        return "bytes " + raw.hex(" ")


def show_row(inputs_row, targets_row, title):
    """Print one row: its text, the token table with the loss mask, and compact views of the mask.
    Position t shows the input token the model reads and the target it must predict there; the
    target counts in the loss when it is >= 0 (targets == -1 are ignored)."""
    inputs_row, targets_row = inputs_row.tolist(), targets_row.tolist()
    T = len(inputs_row)
    # the token after position t: the target, or the next input when the target is masked out
    following = [targets_row[t] if targets_row[t] >= 0 else (inputs_row[t + 1] if t + 1 < T else -1) for t in range(T)]
    trained = [y >= 0 for y in targets_row]
    tokens = inputs_row + ([following[-1]] if following[-1] >= 0 else [])
    # a row of one conversation is padded with untrained <|bos|>: summarised, not printed
    length = len(tokens)
    if mode != "pretrain":
        bos = tokenizer.get_bos_token_id()
        while length > 1 and tokens[length - 1] == bos and not trained[length - 2]:
            length -= 1
    padding = f" + <|bos|> x {len(tokens) - length} (padding, ignored)" if length < len(tokens) else ""
    print(f"--- {title}: raw text ({len(tokens)} tokens, decoded) ---")
    print(tokenizer.decode(tokens[:length]) + padding)
    print(f"--- {title}: tokens (loss = yes: the target is trained on; - : ignored, target -1) ---")
    print(f"{'pos':>5} {'input':>6} {'target':>6}  loss  {'input piece':<22} -> target piece")
    positions = min(T, length)  # positions before the padding
    shown = min(positions, show_tokens)
    for t in range(shown):
        print(f"{t:>5} {inputs_row[t]:>6} {targets_row[t]:>6}  {'yes' if trained[t] else '-':<4}  "
              f"{pad(piece(inputs_row[t]), 22)} -> {piece(following[t])}")
    if shown < positions:
        print(f"  ... {positions - shown} more positions (--show_tokens={positions} shows them)")
    if positions < T:
        print(f"  ... positions {positions}..{T - 1}: padding")
    print(f"--- {title}: loss mask, one mark per target position ('#' trained, '.' ignored) ---")
    for start in range(0, T, 64):
        print(f"{start:>5}  {''.join('#' if m else '.' for m in trained[start:start + 64])}")
    print(f"--- {title}: the row with its trained targets in [[ ]] ({sum(trained)} of {T} trained) ---")
    out, run, run_trained = [tokenizer.decode(tokens[:1])], [], None
    for token, m in [(tokens[t + 1], trained[t]) for t in range(length - 1)] + [(None, None)]:
        if m != run_trained and run:
            out.append(f"[[{tokenizer.decode(run)}]]" if run_trained else tokenizer.decode(run))
            run = []
        run_trained = m
        run.append(token)
    print("".join(out) + padding)


section(f"3. batch ({mode})")
if mode == "pretrain":
    from nanochat.dataloader import data_loader
    inputs, targets, position = next(data_loader(B, T, "train", tokenizer, device, data_dir=data_dir or None))
    print(f"source: data_loader(B={B}, T={T}, split='train') over the parquet shards; position after it: {position}")
    print("each row: documents packed back to back, each opening with <|bos|>; targets = inputs shifted by one")
elif mode == "sft":
    from nanochat import tasks
    from nanochat.chat_data import conversation_batches
    # the SFT mix of scripts/chat_sft.py (the script runs on import, so it is built here the same way)
    sources = [tasks.Identity("train", size=identity_examples), tasks.Arithmetic("train", size=generated_examples),
               tasks.Spelling("train", size=generated_examples)]
    if chitchat_examples:
        sources.append(tasks.ChitChat("train", stop=chitchat_examples))
    if data_path:
        sources.append(tasks.JSONLConversations(data_path))
    sources = [src for src in sources if len(src)]
    if not sources:
        raise SystemExit("sft: the mixture is empty (all example counts are 0 and no --data_path)")
    mixture = tasks.TaskMixture(sources, seed=seed)
    print("source: " + ", ".join(f"{type(src).__name__} {len(src):,}" for src in sources) + f" -> TaskMixture(seed={seed})")
    print(f"conversation_batches(B={B}, T={T}, pack={pack}): each conversation rendered by "
          "tokenizer.render_conversation; targets only on assistant tokens, -1 elsewhere")
    inputs, targets, position = next(conversation_batches(mixture, tokenizer, B, T, device, pack=pack))
    print(f"position after it: {position}")
    print(f"first conversation of the mixture: {json.dumps(mixture.get(0), ensure_ascii=False)}")
else:
    from nanochat import dpo, tasks
    if data_path:  # as scripts/chat_dpo.py: the user's pairs alone, else pairs from a checkable task
        pairs = tasks.PreferencePairs(data_path)
    else:
        pairs = tasks.TaskMixture([tasks.VerifiablePairs(tasks.Arithmetic("train", size=generated_examples), seed=seed)],
                                  seed=seed)
    print(f"source: {type(pairs).__name__} of {len(pairs):,} preference pairs"
          + ("" if data_path else " (VerifiablePairs over Arithmetic: the gold reply vs a near-miss answer)"))
    print(f"dpo.render_pair + dpo.pairs_to_batch: B={B} pairs -> {2 * B} rows (the chosen rows, then the rejected "
          f"ones), padded to the longest; targets only on the final reply, -1 elsewhere")
    rendered, first_pair = [], None
    for i in range(len(pairs)):
        pair = pairs.get(i)
        r = dpo.render_pair(tokenizer, pair, T)  # None: a reply cut off by T, or chosen == rejected
        if r is not None:
            first_pair = first_pair or pair
            rendered.append(r)
        if len(rendered) == B:
            break
    if not rendered:
        raise SystemExit(f"dpo: no usable pair in the first {len(pairs)} (each needs a reply within {T} tokens that "
                         f"differs between chosen and rejected)")
    inputs, targets = dpo.pairs_to_batch(rendered, tokenizer.get_bos_token_id(), device)
    B = len(rendered)
    print(f"first pair: prompt {json.dumps(first_pair['prompt'], ensure_ascii=False)}")
    for side in ("chosen", "rejected"):
        last = first_pair[side]["conversations"][-1]["content"]
        print(f"  {side:<8} reply: {json.dumps(last, ensure_ascii=False)}")

mask = targets >= 0
print(describe("inputs", inputs))
print(describe("targets", targets))
print(describe("loss mask", mask) + "  (= targets >= 0)")
print(f"trained targets per row: {mask.sum(dim=1).tolist()} of {inputs.size(1)}")
if mode == "dpo":
    for r in range(min(show_rows, B)):
        show_row(inputs[r], targets[r], f"row {r} (pair {r}, chosen)")
        show_row(inputs[B + r], targets[B + r], f"row {B + r} (pair {r}, rejected)")
else:
    for r in range(min(show_rows, inputs.size(0))):
        show_row(inputs[r], targets[r], f"row {r}")

# ----------------------------------------------------------------------------- 4. one optimizer step
section("4. one optimizer step")
if mode == "dpo":
    # The reference is the model before this step (chat_dpo: the SFT checkpoint, frozen), so the
    # first loss is exactly log 2: every implicit reward beta * (log pi - log ref) starts at 0.
    with torch.no_grad(), autocast:
        ref_logps = dpo.sequence_logps(model, inputs, targets)

    def compute_loss():
        with autocast:
            logps = dpo.sequence_logps(model, inputs, targets)
        losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta)
        return losses.mean(), logps, chosen_rewards, rejected_rewards

    def show_pairs(logps, chosen_rewards, rejected_rewards):
        for i in range(B):
            print(f"  pair {i}: log p(chosen) {logps[i].item():10.4f}  log p(rejected) {logps[B + i].item():10.4f}"
                  f"  reward chosen {chosen_rewards[i].item():+.5f}  rejected {rejected_rewards[i].item():+.5f}")

    loss, logps, rc, rr = compute_loss()
    print(f"reference log-probs (sum over each reply's trained tokens): {[round(v, 4) for v in ref_logps.tolist()]}")
    print(f"loss before: {loss.item():.6f}  (mean DPO loss over {B} pairs, beta {beta}; log 2 = {math.log(2):.6f}: "
          f"the policy equals the reference)")
    show_pairs(logps.detach(), rc, rr)
else:
    def compute_loss():
        with autocast:
            return model(inputs, targets)

    loss = compute_loss()
    print(f"loss before: {loss.item():.6f}  (mean cross-entropy over {int(mask.sum())} trained targets; "
          f"ln(vocab) = {math.log(vocab_size):.4f} is a uniform guess)")
loss_before = loss.item()
loss.backward()
grad_sq = {n: p.grad.float().pow(2).sum().item() if p.grad is not None else 0.0 for n, p in model.named_parameters()}
global_norm = math.sqrt(sum(grad_sq.values()))
print(f"global grad norm: {global_norm:.6f}")
print("grad norm per optimizer group:")
for label, lr, params in groups:
    print(f"  {label:<44} {math.sqrt(sum(grad_sq[n] for n in params)):.6f}")
before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
if grad_clip > 0:
    scale = min(1.0, grad_clip / (global_norm + 1e-6))
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    print(f"clipped to grad_clip={grad_clip}: gradients scaled by {scale:.4f}")
for opt in optimizers:
    opt.step()
model.zero_grad(set_to_none=True)
print("per parameter: grad norm, update norm |dW| and its size relative to |W|")
print(f"{'name':<34} {'optimizer':<9} {'grad':>11} {'update':>11} {'|dW|/|W|':>10}")
for n, p in model.named_parameters():
    delta = (p.detach().float() - before[n]).norm().item()
    w = before[n].norm().item()
    print(f"{n:<34} {optimizer_of[n]:<9} {math.sqrt(grad_sq[n]):>11.4e} {delta:>11.4e} "
          + (f"{delta / w:>10.3e}" if w > 0 else f"{'(W was 0)':>10}"))
if any(v == 0 for v in grad_sq.values()):
    print("(a zero gradient is expected on a fresh model's first step: each block's output projections start at 0,\n"
          " so nothing flows back into the matrices before them until those projections have moved)")
with torch.no_grad():
    after = compute_loss()
loss_after = (after[0] if mode == "dpo" else after).item()
print(f"loss after:  {loss_after:.6f}  (same batch; change {loss_after - loss_before:+.6f})")
if mode == "dpo":
    show_pairs(*after[1:])
    margin = after[2] - after[3]
    print(f"reward accuracy (chosen reward > rejected): {(margin > 0).float().mean().item():.3f}"
          f" | mean margin {margin.mean().item():+.6f}")

# ----------------------------------------------------------------------------- 5. generate
section("5. generate")
model.eval()
if mode == "pretrain":
    prompt_ids = tokenizer.encode(prompt, prepend="<|bos|>")
    print("prompt as raw text after <|bos|> (a base model continues text)")
else:
    prompt_ids = tokenizer.render_for_completion({"conversations": [{"role": "user", "content": prompt}]})
    print("prompt as a chat turn (tokenizer.render_for_completion: ... <|assistant_start|>)")
print(f"prompt: {prompt}")
print(f"prompt ids: {prompt_ids}")
print("prompt pieces: " + " ".join(piece(i) for i in prompt_ids))
engine = Engine(model, tokenizer)
with autocast:
    results, masks = engine.generate_batch(prompt_ids, num_samples=1, max_tokens=max_tokens, temperature=temperature,
                                           top_k=top_k or None, seed=seed)
print(f"generated ids ({len(results[0])}, temperature {temperature}, top_k {top_k or 'off'}): {results[0]}")
if 0 in masks[0]:
    print(f"({masks[0].count(0)} of them forced by the calculator tool, not sampled)")
print(f"generated text: {tokenizer.decode(results[0])}")
