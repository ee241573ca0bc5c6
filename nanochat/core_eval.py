"""
The CORE metric (DCLM, arXiv:2406.11794): in-context evaluation of a base model on
multiple-choice, schema and language-modeling tasks, each centered against its random baseline.

    results, core = evaluate_core(model, tokenizer, tasks, data_dir, device, max_per_task=200)

Scoring, as DCLM does it. Every example gets `num_fewshot` solved examples in front, drawn from
the same task (excluding itself) with a fixed per-example seed, joined by blank lines.
- multiple_choice: shared context, one continuation per choice; the choice whose continuation
  tokens have the lowest mean loss is the model's answer.
- schema: one context per option, a shared continuation; the option under which the
  continuation has the lowest mean loss wins.
- language_modeling: correct when greedy argmax predicts every continuation token.
centered = (accuracy - random_baseline) / (1 - random_baseline); CORE = mean of centered.

Batched: the rows of several examples (one per choice/option) are padded into one forward.
Under torchrun each rank takes examples rank::world_size and the counts are all-reduced.
Sequences longer than max_len are cropped from the left (the end is what is scored).

By default a task keeps a fixed spread of max_per_task examples in file order and rows are cropped
to the training length. comparable=True follows nanochat's scripts/base_eval.py instead: the rows
shuffled with random.Random(1337), then its first max_per_task (all when None), shots drawn by
position in that order; pair it with max_len=input_limit(model, comparable=True).
"""
import json
import os
import random
import time

import torch
import torch.distributed as dist

from nanochat.eval_data import LM, MC, SCHEMA, load_jsonl, task_list

FEWSHOT_SEED = 1234    # example i draws its shots with random.Random(FEWSHOT_SEED + i) (nanochat's seed)
SAMPLE_SEED = 42       # which examples --max_per_task keeps (a fixed spread over the whole file)
REFERENCE_SEED = 1337  # nanochat's base_eval shuffles every task's rows with random.Random(1337)


def fewshot_indices(n, index, k, seed=FEWSHOT_SEED):
    """k distinct indices in range(n) other than `index`, fixed for (seed, index)."""
    k = min(k, n - 1)
    if k <= 0:
        return []
    picks = random.Random(seed + index).sample(range(n - 1), k)
    return [j + (j >= index) for j in picks]  # skip the example itself


def render_prompts(item, task_type, delimiter, fewshot):
    """The texts to score for one example: MC/schema one per choice/option; LM
    [prompt without continuation, prompt with it]."""
    if task_type == MC:
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == SCHEMA:
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{ctx}{delimiter}{item['continuation']}" for ctx in item["context_options"]]
    if task_type == LM:
        # contexts are trimmed, the item's and the shots' (as nanochat's render_prompts_lm): some
        # bundle files carry stray whitespace that would otherwise sit before the delimiter
        shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        prompt = f"{shots}{item['context'].strip()}{delimiter}"
        # the delimiter's trailing space goes with the continuation (" sound" is one token)
        return [prompt.strip(), prompt + item["continuation"]]
    raise ValueError(f"unknown task type {task_type!r}")


def _common_prefix(seqs):
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _common_suffix(seqs):
    return _common_prefix([s[::-1] for s in seqs])


def scored_rows(token_lists, task_type):
    """token_lists (BOS first) -> [(tokens, start, end)]: the rows to run and the span of each
    row whose tokens are scored (the continuation)."""
    if task_type == MC:
        start = min(_common_prefix(token_lists), min(len(t) for t in token_lists) - 1)
        return [(t, max(1, start), len(t)) for t in token_lists]
    if task_type == SCHEMA:
        suffix = max(1, min(_common_suffix(token_lists), min(len(t) for t in token_lists) - 1))
        return [(t, len(t) - suffix, len(t)) for t in token_lists]
    if task_type == LM:
        prompt, full = token_lists
        start = min(_common_prefix([prompt, full]), len(full) - 1)
        return [(full, max(1, start), len(full))]
    raise ValueError(f"unknown task type {task_type!r}")


def crop(tokens, start, end, max_len):
    """Keep the last max_len tokens (the scored span is at the end); at least one token of
    context stays before the span."""
    if max_len is None or len(tokens) <= max_len:
        return tokens, start, end
    drop = len(tokens) - max_len
    return tokens[drop:], max(1, start - drop), end - drop


@torch.no_grad()
def score_rows(model, rows, device, task_type, pad_id=0):
    """One forward over padded rows [(tokens, start, end)] -> per row (mean continuation loss,
    whether greedy argmax gets every continuation token right)."""
    width = max(len(t) for t, _, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (tokens, start, end) in enumerate(rows):
        ids[r, :len(tokens)] = torch.tensor(tokens)
        # position i predicts token i + 1: the span's tokens are predicted at start-1 .. end-2
        targets[r, start - 1:end - 1] = torch.tensor(tokens[start:end])
    ids, targets = ids.to(device), targets.to(device)
    out = []
    if task_type == LM:
        logits = model(ids)
        hits = logits.argmax(dim=-1) == targets
        losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-1, reduction="none")
        for r, (_, start, end) in enumerate(rows):
            out.append((losses[r, start - 1:end - 1].mean().item(), bool(hits[r, start - 1:end - 1].all())))
    else:
        losses = model(ids, targets, loss_reduction="none")
        for r, (_, start, end) in enumerate(rows):
            out.append((losses[r, start - 1:end - 1].float().mean().item(), False))
    return out


def example_rows(tokenizer, data, index, task, max_len):
    item = data[index]
    fewshot = [data[j] for j in fewshot_indices(len(data), index, task["num_fewshot"])]
    prompts = render_prompts(item, task["task_type"], task["continuation_delimiter"], fewshot)
    token_lists = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    return [crop(t, s, e, max_len) for t, s, e in scored_rows(token_lists, task["task_type"])]


def judge(task_type, scores, item):
    """Per-example verdict from its rows' (mean loss, greedy hit)."""
    if task_type == LM:
        return scores[0][1]
    losses = [loss for loss, _ in scores]
    return losses.index(min(losses)) == item["gold"]


def select_examples(n, max_examples, seed=SAMPLE_SEED):
    """Indices evaluated: all, or a fixed random spread of max_examples (files are often sorted)."""
    if not max_examples or max_examples >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_examples))


def reference_order(data, seed=REFERENCE_SEED):
    """The rows in the order nanochat's base_eval evaluates them (a copy; `data` is left alone)."""
    rows = list(data)
    random.Random(seed).shuffle(rows)
    return rows


def input_limit(model, comparable=False):
    """Longest row to score. By default the training length; comparable: what the model can take
    at all (its rotary table, 10 x sequence_len), since nanochat never crops its own model."""
    return model.cos.size(1) if comparable else model.config.sequence_len


def _dist():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate_task(model, tokenizer, data, task, device, max_len=None, max_examples=None, batch_tokens=8192,
                  progress=None):
    """-> (correct, total) over the selected examples, summed over DDP ranks.
    Rows are packed into forwards of at most batch_tokens (padded) tokens, shortest first."""
    rank, world_size = _dist()
    indices = select_examples(len(data), max_examples)[rank::world_size]
    task_type = task["task_type"]
    correct = 0
    chunk = 64  # examples rendered at a time (bounded memory; progress between chunks)
    for c in range(0, len(indices), chunk):
        part = indices[c:c + chunk]
        rows = [(i, k, row) for i in part for k, row in enumerate(example_rows(tokenizer, data, i, task, max_len))]
        rows.sort(key=lambda x: len(x[2][0]))
        scores = {}
        b = 0
        while b < len(rows):
            e = b + 1
            while e < len(rows) and (e + 1 - b) * len(rows[e][2][0]) <= batch_tokens:
                e += 1
            for (i, k, _), s in zip(rows[b:e], score_rows(model, [r for _, _, r in rows[b:e]], device, task_type)):
                scores.setdefault(i, {})[k] = s
            b = e
        for i in part:
            correct += judge(task_type, [scores[i][k] for k in sorted(scores[i])], data[i])
        if progress:
            progress(min(c + chunk, len(indices)), len(indices))
    counts = torch.tensor([correct, len(indices)], dtype=torch.long, device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


def centered_accuracy(accuracy, random_baseline):
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def evaluate_core(model, tokenizer, tasks, data_dir, device, max_per_task=None, max_len=None, batch_tokens=8192,
                  progress=None, comparable=False):
    """Run every task that has data -> (results, core). results: one dict per task in `tasks`
    (label, task_type, num_fewshot, random_baseline, accuracy, centered, n, seconds), or with
    "missing" for tasks that have no data. core = mean centered accuracy of the tasks that ran.
    comparable: nanochat's example selection (see the module docstring)."""
    results = []
    for task in tasks:
        if task.get("missing"):
            results.append(dict(task))
            continue
        data = load_jsonl(os.path.join(data_dir, task["dataset_uri"]), task["task_type"])
        if comparable:  # the shuffled head is the whole pool: the shots come from it too
            data = reference_order(data)[:max_per_task or None]
        t0 = time.time()
        cb = (lambda done, total, label=task["label"]: progress(label, done, total)) if progress else None
        correct, total = evaluate_task(model, tokenizer, data, task, device, max_len,
                                       None if comparable else max_per_task, batch_tokens, cb)
        accuracy = correct / max(total, 1)
        results.append(dict(task, accuracy=accuracy, centered=centered_accuracy(accuracy, task["random_baseline"]),
                            n=total, seconds=time.time() - t0))
    ran = [r["centered"] for r in results if "centered" in r]
    core = sum(ran) / len(ran) if ran else float("nan")
    return results, core


def nanochat_comparability(tasks, comparable):
    """Why a run over `tasks` cannot stand beside nanochat's published CORE ([] when it can)."""
    ran = [t for t in tasks if not t.get("missing")]
    reasons = []
    if not comparable:
        reasons.append("our example sampling, rows cropped to sequence_len (--comparable=True)")
    if any(t.get("source") != "dclm" for t in ran):
        reasons.append("tasks converted offline, not DCLM's bundle (--bundle=dclm)")
    if len(ran) < len(task_list()):
        reasons.append(f"{len(ran)} of the {len(task_list())} CORE tasks")
    return reasons


def results_table(results, core):
    """A markdown table: task, type, shots, accuracy, centered, n (missing tasks named)."""
    lines = ["| task | type | shots | accuracy | centered | n |", "|---|---|---|---|---|---|"]
    for r in results:
        if r.get("missing"):
            lines.append(f"| {r['label']} | {r['task_type']} | {r['num_fewshot']} | missing: {r['missing']} | | 0 |")
        else:
            lines.append(f"| {r['label']} | {r['task_type']} | {r['num_fewshot']} | {r['accuracy']:.4f} | "
                         f"{r['centered']:+.4f} | {r['n']} |")
    ran = sum(1 for r in results if not r.get("missing"))
    lines.append(f"| **CORE** ({ran} of {len(results)} tasks) | | | | **{core:+.4f}** | |")
    return "\n".join(lines)


def write_results_json(path, results, core, extra=None):
    from nanochat.eval_data import _write_atomic
    _write_atomic(path, json.dumps({"core": core, "results": results, **(extra or {})}, indent=1))
