"""
What a training run actually trained on, per source: documents, tokens, how many of them the
run samples, and the val fraction. Every training script writes dataset_stats.json beside its
config snapshot (config.json in the checkpoint directory), so a checkpoint says what it saw.

Pretraining (corpus_stats): per source (the `source` column of a built corpus, the folder of a
downloaded one; one epoch of a download is its interleaved reading order). Tokens are counted by
tokenizing the train split up to `max_chars` characters; beyond that each document counts as
its source's mean (marked "estimated"), so a multi-GB corpus costs seconds, not minutes. Sampled documents = documents x epochs, the
epochs of the run being the tokens it trains on / the train tokens (the shards are shuffled
across sources, so every source is sampled at the same rate).

A user file that nanochat.clean_data wrote carries its cleaning summary (kept, removed by
reason, the report's path) into its entry, for pretraining and fine-tuning alike.

Fine-tuning (task_stats): per task of the mixture. A TaskMixture is one shuffle of all its
tasks' examples, so a run that takes N examples samples each task in proportion to its size.
"""
import json
import os

from nanochat.dataset import default_data_dir, iter_row_groups

MAX_CHARS = 50_000_000  # tokenize at most this much text per run start (seconds); extrapolate beyond


def corpus_stats(data_dir, tokenizer, tokens_to_train, max_chars=MAX_CHARS):
    """{source: {...}, "_run": {...}} for the parquet corpus in data_dir (default <base>/base_data).
    Reads only the `source` column, plus the text of the first max_chars characters of train."""
    per_source, budget = {}, max_chars
    for split in ("train", "val"):
        for _, values in iter_row_groups(split, data_dir, columns=("source",)):
            for source in values["source"]:
                per_source.setdefault(source, _empty())[f"{split}_docs"] += 1
        if split == "train":  # exact token counts while the budget lasts, in reading order (every source of a mixture)
            for _, values in iter_row_groups(split, data_dir, columns=("source", "text")):
                if budget <= 0:
                    break
                budget -= sum(map(len, values["text"]))
                for source, ids in zip(values["source"], tokenizer.encode(values["text"])):
                    s = per_source[source]
                    s["counted_docs"] += 1
                    s["counted_tokens"] += len(ids) + 1  # + the BOS every document gets
    out = _finish_corpus(per_source, tokens_to_train)
    for source, cleaning in _built_cleaning(data_dir).items():  # what the cleaning pass removed from each user file
        if source in out:
            out[source]["cleaning"] = cleaning
    return out


def _built_cleaning(data_dir):
    """{source: cleaning summary} from the dataset_stats.json that nanochat.dataset wrote beside the shards."""
    try:
        with open(os.path.join(data_dir or default_data_dir(), "dataset_stats.json"), encoding="utf-8") as f:
            built = json.load(f)
    except (OSError, ValueError):
        return {}
    return {source: s["cleaning"] for source, s in built.items() if isinstance(s, dict) and "cleaning" in s}


def _empty():
    return {"train_docs": 0, "val_docs": 0, "counted_docs": 0, "counted_tokens": 0}


def _finish_corpus(per_source, tokens_to_train):
    """Uncounted documents get their source's mean tokens per document (or the corpus mean)."""
    all_docs = sum(s["counted_docs"] for s in per_source.values())
    corpus_mean = sum(s["counted_tokens"] for s in per_source.values()) / all_docs if all_docs else 0.0
    out, train_tokens = {}, 0
    for source, s in sorted(per_source.items()):
        mean = s["counted_tokens"] / s["counted_docs"] if s["counted_docs"] else corpus_mean
        tokens = s["counted_tokens"] + round(mean * (s["train_docs"] - s["counted_docs"]))
        train_tokens += tokens
        docs = s["train_docs"] + s["val_docs"]
        out[source] = {"documents": docs, "train_docs": s["train_docs"], "train_tokens": tokens,
                       "tokens_estimated": s["counted_docs"] < s["train_docs"],
                       "val_fraction": round(s["val_docs"] / docs, 4) if docs else 0.0}
    epochs = tokens_to_train / train_tokens if train_tokens else 0.0
    for s in out.values():
        s["sampled_docs"] = round(s["train_docs"] * epochs)
        s["sampled_tokens"] = round(s["train_tokens"] * epochs)
    out["_run"] = {"train_tokens": train_tokens, "tokens_to_train": tokens_to_train, "epochs": round(epochs, 4)}
    return out


def task_name(task):
    return getattr(task, "name", None) or type(task).__name__


def task_stats(train_task, val_task, tokenizer, examples_to_train, sample=64):
    """{task: {...}, "_run": {...}} for the tasks of a TaskMixture (or a single task)."""
    train_parts = getattr(train_task, "tasks", [train_task])
    val_parts = {task_name(t): len(t) for t in getattr(val_task, "tasks", [val_task])} if val_task is not None else {}
    total = sum(len(t) for t in train_parts) or 1
    out = {}
    for task in train_parts:
        name, n = task_name(task), len(task)
        step = max(1, n // sample)  # mean rendered length from an even sample of the task
        lengths = [len(tokenizer.render_conversation(task.get(i))[0]) for i in range(0, n, step)][:sample]
        mean_len = sum(lengths) / len(lengths) if lengths else 0.0
        n_val = val_parts.get(name, 0)
        entry = out.setdefault(name, {"documents": 0, "tokens": 0, "sampled_docs": 0, "val_docs": 0})
        entry["documents"] += n  # a task listed twice (upweighted) adds up
        entry["tokens"] += round(mean_len * n)
        entry["tokens_estimated"] = len(lengths) < n
        entry["sampled_docs"] += round(examples_to_train * n / total)
        entry["val_docs"] = n_val
        entry["val_fraction"] = round(n_val / (entry["documents"] + n_val), 4) if entry["documents"] + n_val else 0.0
        if getattr(task, "cleaning", None):  # a user file the cleaning pass wrote: what it kept and removed
            entry["cleaning"] = task.cleaning
    out["_run"] = {"train_examples": total, "examples_to_train": examples_to_train,
                   "epochs": round(examples_to_train / total, 4)}
    return out


def write_stats(checkpoint_dir, stats):
    """dataset_stats.json beside config.json, written atomically."""
    from nanochat.common import atomic_open
    with atomic_open(os.path.join(checkpoint_dir, "dataset_stats.json"), "w") as f:
        json.dump(stats, f, indent=2, ensure_ascii=False)


def format_stats(stats):
    """A short table for the log."""
    rows = [f"{'source':<24} {'docs':>9} {'tokens':>12} {'sampled':>9} {'val frac':>8}"]
    for name, s in stats.items():
        if name == "_run":
            continue
        tokens = s.get("train_tokens", s.get("tokens", 0))
        rows.append(f"{name:<24} {s['documents']:>9,} {tokens:>12,}{'~' if s.get('tokens_estimated') else ' '}"
                    f"{s['sampled_docs']:>8,} {s['val_fraction']:>8.3f}")
        if s.get("cleaning"):
            c = s["cleaning"]
            removed = ", ".join(f"{reason} {n:,}" for reason, n in list(c["removed"].items())[:4])
            rows.append(f"{'':<24} cleaned: kept {c['kept']:,}, removed {c['removed_total']:,}" + (f" ({removed})" if removed else ""))
    rows.append(f"epochs this run: {stats['_run']['epochs']:.3f}")
    return "\n".join(rows)
