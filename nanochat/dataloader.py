"""
Pretraining batches: stream parquet shards, tokenize in batches, pack BOS-aligned rows.

Lanes. The data is split into `num_lanes` independent streams: lane i takes documents
i, i+L, i+2L, ... of every row group. A run with W ranks and A gradient-accumulation steps
uses L = W*A lanes, rank r feeding micro-step k from lane r*A + k. So one process with
twice the accumulation sees exactly the batches that two processes see: the loss curves
match up to float summation order.

Packing. Each document is `<|bos|>` + its tokens. The documents of one row group are
packed into rows of T+1 tokens by best fit (see pack_rows): every document start keeps its
BOS, a long document's continuation always opens a row, and only the row group's last
partial rows are dropped (about 5% of tokens on the default corpus at T=256).

Resume. Packing depends only on one row group, so the position (epoch, row group, rows
already taken from it) is exact: resuming re-tokenizes that row group and skips the rows.
"""
import bisect

import torch

from nanochat.dataset import iter_row_groups


def pack_rows(docs_tokens, row_len):
    """
    Pack token lists (each starting with BOS) into rows of exactly row_len tokens.
    A document longer than a row is cut; its later pieces are continuations and may only
    open a row (never follow another document mid-row). Rows are then filled by best fit
    with document starts; when none fits, the shortest is cropped and its tail becomes a
    continuation. Only the last, partial rows of the batch of documents are dropped.
    """
    openers, fillers = [], []
    for tokens in docs_tokens:
        fillers.append(tokens[:row_len])
        openers.extend(tokens[i:i + row_len] for i in range(row_len, len(tokens), row_len))
    fillers.sort(key=len)
    lengths = [len(p) for p in fillers]
    rows = []
    while openers or fillers:
        if openers:
            row = openers.pop()
        else:
            row = fillers.pop()  # the longest document start opens the row
            lengths.pop()
        while len(row) < row_len and fillers:
            room = row_len - len(row)
            i = bisect.bisect_right(lengths, room) - 1  # the longest document start that fits
            if i < 0:  # none fits: crop the shortest, its tail opens a later row
                piece = fillers.pop(0)
                lengths.pop(0)
                row.extend(piece[:room])
                openers.append(piece[room:])
                break
            row.extend(fillers.pop(i))
            lengths.pop(i)
        if len(row) == row_len:
            rows.append(row)
    return rows


def data_loader(B, T, split, tokenizer, device="cpu", lane=0, num_lanes=1, state=None,
                data_dir=None, encode_batch=256):
    """
    Infinite generator of (inputs, targets, state) with inputs/targets of shape (B, T).
    `state` = {"epoch", "row_group", "rows_taken"} is the position of the next unseen row;
    pass a yielded state back in to resume exactly there.
    """
    bos = tokenizer.get_bos_token_id()
    state = dict(state or {"epoch": 0, "row_group": 0, "rows_taken": 0})
    epoch, start_rg, skip = state["epoch"], state["row_group"], state["rows_taken"]
    use_cuda = torch.device(device).type == "cuda"
    pending = []  # rows not yet put into a batch: (row, position after taking it)
    while True:
        any_rows = False
        for rg_index, values in iter_row_groups(split, data_dir, start=start_rg):
            docs = values["text"][lane::num_lanes]
            tokens = []
            for i in range(0, len(docs), encode_batch):
                tokens.extend(tokenizer.encode(docs[i:i + encode_batch], prepend=bos))
            rows = pack_rows(tokens, T + 1)
            any_rows = any_rows or bool(rows)
            for r in range(skip, len(rows)):
                pending.append((rows[r], {"epoch": epoch, "row_group": rg_index, "rows_taken": r + 1}))
                if len(pending) == B:
                    batch = torch.tensor([row for row, _ in pending], dtype=torch.long)
                    position = pending[-1][1]
                    pending = []
                    if use_cuda:
                        batch = batch.pin_memory().to(device, non_blocking=True)
                    else:
                        batch = batch.to(device)
                    yield batch[:, :-1], batch[:, 1:], position
            skip = 0
        if not any_rows and start_rg == 0:
            raise ValueError(f"split '{split}' yields no full row of {T + 1} tokens for lane {lane}/{num_lanes}: "
                             f"too little data (add documents or lower max_seq_len)")
        epoch, start_rg = epoch + 1, 0
