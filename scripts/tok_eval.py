"""
Compression (UTF-8 bytes per token; higher is better) of our tokenizer on English, Chinese
and code, beside GPT-4's (cl100k_base), o200k_base, GPT-2's and a HuggingFace `tokenizers`
BPE trained on the same text at the same vocab size.

    python -m scripts.tok_eval
    python -m scripts.tok_eval --hf_max_chars=20000000   # train the HF peer on less text
"""
import os
import sys

if not __package__:  # run as a file: python scripts/tok_eval.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

tokenizer_dir = ""      # "" = <base>/tokenizer
data_dir = ""           # shards for the English / Chinese samples; "" = <base>/base_data
sample_chars = 300_000  # per language, taken from the val shard
hf_max_chars = 0        # 0 = the same text our tokenizer was trained on (its tokenizer.json metadata)
references = True       # GPT-4 / o200k from the pinned bpe-openai wheel (fetched from PyPI once, then cached)

from nanochat.configurator import configure
config = configure(globals())

import argparse
import dataclasses
import importlib.util
import json
import time

from nanochat.common import get_base_dir
from nanochat.dataset import iter_row_groups, list_parquet_files, parquets_iter_batched
from nanochat.tokenizer import MANIFEST_FILE, RustBPETokenizer
from scripts.reference_tokenizers import reference_encoding, train_hf_bpe

tokenizer_dir = tokenizer_dir or os.path.join(get_base_dir(), "tokenizer")
data_dir = data_dir or os.path.join(get_base_dir(), "base_data")
ours = RustBPETokenizer.from_directory(tokenizer_dir)
with open(os.path.join(tokenizer_dir, MANIFEST_FILE), encoding="utf-8") as f:
    train_meta = json.load(f).get("metadata", {})

# ----------------------------------------------------------------------------
# Samples: English and Chinese documents of the val shard (by CJK share), code from the stdlib.


def is_chinese(text):
    head = text[:2000]
    return sum("\u4e00" <= c <= "\u9fff" for c in head) > 0.2 * len(head)


samples = {"English": [], "Chinese": []}
sources = {"English": set(), "Chinese": set()}
if not list_parquet_files("val", data_dir=data_dir):
    sys.exit(f"no val shard in {data_dir}: run `python -m nanochat.dataset` first")
for _, values in iter_row_groups("val", data_dir, columns=("text", "source")):  # row group by row group: web shards are GBs
    for text, source in zip(values["text"], values["source"]):
        lang = "Chinese" if is_chinese(text) else "English"
        if sum(map(len, samples[lang])) < sample_chars:
            samples[lang].append(text)
            sources[lang].add(source)
    if all(sum(map(len, samples[lang])) >= sample_chars for lang in ("English", "Chinese")):
        break
for lang in [lang for lang, docs in samples.items() if not docs]:  # a user's corpus may hold one language only
    print(f"tok_eval: no {lang} document in the val split of {data_dir}: no {lang} row")
    del samples[lang]
code_files = [argparse.__file__, dataclasses.__file__]
samples["code"] = [open(p, encoding="utf-8").read() for p in code_files]
sources["code"] = {os.path.basename(p) for p in code_files}

# ----------------------------------------------------------------------------
# The peers. The HF BPE learns from the same stream tok_train used (same docs, caps, limit).
peers = {f"ours ({ours.get_vocab_size()})": lambda docs: ours.encode(docs)}
notes = []
for name, label in [("cl100k_base", "GPT-4 cl100k"), ("o200k_base", "o200k")]:
    enc, reason = reference_encoding(name) if references else (None, "skipped (--references=False)")
    if enc is None:
        notes.append(f"{label}: {reason}")
        peers[label] = None
    else:
        peers[label] = lambda docs, enc=enc: enc.encode_ordinary_batch(docs)
peers["GPT-2 r50k"] = None
notes.append("GPT-2 r50k: not available offline (tiktoken downloads it; no package on PyPI ships it)")

hf_train_dir = train_meta.get("data_dir", data_dir)
hf_doc_cap = train_meta.get("doc_cap", 10_000)
hf_limit = hf_max_chars or train_meta.get("train_chars", 2_000_000_000)
hf_chars = 0


def hf_texts():
    global hf_chars
    for batch in parquets_iter_batched(split="train", data_dir=hf_train_dir):
        for doc in batch:
            doc = doc[:hf_doc_cap]
            hf_chars += len(doc)
            yield doc
            if hf_chars >= hf_limit:
                return


n_mergeable = ours.get_vocab_size() - len(ours.get_special_tokens())
if importlib.util.find_spec("tokenizers") is None:  # a dev dependency: `pip install -e .` alone lacks it
    peers["HF BPE"] = None
    notes.append("HF BPE: skipped, HuggingFace `tokenizers` is not installed (pip install tokenizers, or -e '.[dev]')")
else:
    t0 = time.time()
    hf = train_hf_bpe(hf_texts(), n_mergeable, pattern=ours.get_pattern())
    print(f"HF tokenizers BPE: trained in {time.time() - t0:.1f}s on {hf_chars:,} chars from {hf_train_dir} "
          f"(vocab {hf.get_vocab_size()}; ours {n_mergeable} without specials)")
    peers[f"HF BPE ({hf.get_vocab_size()})"] = lambda docs: [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)]

# ----------------------------------------------------------------------------
# The table: bytes per token, per sample.
names = list(peers)
width = max(14, *(len(n) + 2 for n in names))
print()
print(f"{'sample':<9}{'bytes':>11}" + "".join(f"{n:>{width}}" for n in names))
for lang, docs in samples.items():
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    row = f"{lang:<9}{n_bytes:>11,}"
    for name in names:
        if peers[name] is None:
            row += f"{'n/a':>{width}}"
        else:
            n_tokens = sum(len(ids) for ids in peers[name](docs))
            row += f"{n_bytes / n_tokens:>{width}.2f}"
    print(row)
print("\nbytes/token (UTF-8 bytes per token; higher = better compression)")
for lang in samples:
    print(f"  {lang} from: {', '.join(sorted(sources[lang]))}")
for note in notes:
    print(f"  {note}")
