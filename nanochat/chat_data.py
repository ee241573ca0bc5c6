"""
Conversations -> training batches for mid-training, SFT and chat distillation.

Batches. Each conversation is rendered with tokenizer.render_conversation (ids + loss mask,
<|bos|> first) and cut to T+1 tokens. Rows of T+1 tokens are filled with whole conversations
in order (pack=True: as many as fit; pack=False: one per row) and padded; inputs are row[:-1],
targets row[1:] where the mask of that target token is 1, else -1. So the loss is on assistant
tokens only: never on user text, tool output, padding or the next conversation's <|bos|>.

Lanes. Lane i of L takes conversations i, i+L, i+2L, ... of the task (a TaskMixture is already
shuffled). A run with W ranks and A accumulation steps uses L = W*A lanes, rank r feeding
micro-step k from lane r*A + k, as nanochat/dataloader.py does: DDP == accumulation.

Resume. Rows are filled in order, so a batch ends where a conversation did not fit; the state
{"epoch", "index"} names that conversation (the first one not in any yielded row). Passing it
back in resumes exactly.
"""
from nanochat.rows import rows_to_batch


# -----------------------------------------------------------------------------
# Batches

def render_example(tokenizer, conversation, T):
    """(ids, mask) of one conversation, at most T+1 tokens (a row holds T inputs + 1 target)."""
    return tokenizer.render_conversation(conversation, max_tokens=T + 1)


def _lane(task, lane, num_lanes, epoch, index):
    """(epoch, index, conversation) for this lane, from `index` on, epoch after epoch."""
    if len(task) <= lane:
        raise ValueError(f"the task has {len(task)} conversations, too few for data lane {lane} of {num_lanes} "
                         f"(ranks x accumulation steps): add data or lower target_examples_per_step")
    while True:
        for i in range(index, len(task), num_lanes):
            yield epoch, i, task.get(i)
        epoch, index = epoch + 1, lane


def conversation_batches(task, tokenizer, B, T, device="cpu", lane=0, num_lanes=1, state=None, pack=True):
    """Infinite generator of (inputs, targets, state), inputs/targets of shape (B, T); see the module doc."""
    state = state or {"epoch": 0, "index": lane}
    bos = tokenizer.get_bos_token_id()
    rows, row_ids, row_mask = [], [], []
    for epoch, i, conversation in _lane(task, lane, num_lanes, state["epoch"], state["index"]):
        ids, mask = render_example(tokenizer, conversation, T)
        if not any(mask[1:]):
            continue  # nothing to learn once truncated (e.g. a very long user turn)
        if row_ids and (not pack or len(row_ids) + len(ids) > T + 1):
            rows.append((row_ids, row_mask))
            row_ids, row_mask = [], []
            if len(rows) == B:
                inputs, targets = rows_to_batch(rows, T, bos, device)
                rows = []
                yield inputs, targets, {"epoch": epoch, "index": i}  # conversation i is not in a yielded row
        row_ids, row_mask = row_ids + ids, row_mask + mask


def conversation_eval_batches(task, tokenizer, B, T, device="cpu", lane=0, num_lanes=1, max_examples=None):
    """One pass (no packing) over this lane's share of the first max_examples conversations:
    (inputs, targets) batches of up to B rows, the last one possibly smaller."""
    n = len(task) if max_examples is None else min(len(task), max_examples)
    bos = tokenizer.get_bos_token_id()
    rows = []
    for i in range(lane, n, num_lanes):
        rows.append(render_example(tokenizer, task.get(i), T))
        if len(rows) == B or i + num_lanes >= n:
            yield rows_to_batch(rows, T, bos, device)
            rows = []


def estimate_rows_per_epoch(task, tokenizer, T, pack=True, sample=256):
    """Rows one pass over the task fills: exact for pack=False, from a sample's mean length otherwise."""
    if not pack or len(task) == 0:
        return len(task)
    step = max(1, len(task) // sample)
    lengths = [len(render_example(tokenizer, task.get(i), T)[0]) for i in range(0, len(task), step)]
    per_row = max(1.0, (T + 1) / (sum(lengths) / len(lengths)) - 0.5)  # ~half a conversation of padding per row
    return max(1, round(len(task) / per_row))
