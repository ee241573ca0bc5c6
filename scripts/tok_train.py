"""
Train the BPE tokenizer on the pretraining shards and save it (with token_bytes.pt).

    python -m scripts.tok_train --vocab_size=32768 --max_chars=2000000000
    python -m scripts.tok_train --vocab_size=65536 --data_dir=./data --output_dir=./tok
"""
import os
import sys

if not __package__:  # run as a file: python scripts/tok_train.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

vocab_size = 32768       # including the special tokens
max_chars = 2_000_000_000  # stop after this many characters of training text
doc_cap = 10_000         # use at most this many characters of each document
data_dir = ""            # directory of train_*.parquet shards; "" = <base>/base_data
output_dir = ""          # "" = <base>/tokenizer

from nanochat.configurator import configure
config = configure(globals())

import time

from nanochat.common import get_base_dir
from nanochat.dataset import parquets_iter_batched
from nanochat.tokenizer import RustBPETokenizer

data_dir = data_dir or os.path.join(get_base_dir(), "base_data")
output_dir = output_dir or os.path.join(get_base_dir(), "tokenizer")

# ----------------------------------------------------------------------------
# Stream documents (each capped at doc_cap chars) until max_chars; rustbpe pulls them in
# batches, so only the distinct pre-split chunks are ever held in memory.
stats = {"docs": 0, "chars": 0}


def text_iterator():
    for batch in parquets_iter_batched(split="train", data_dir=data_dir):
        for doc in batch:
            doc = doc[:doc_cap]
            stats["docs"] += 1
            stats["chars"] += len(doc)
            yield doc
            if stats["chars"] >= max_chars:
                return


t0 = time.time()
tokenizer = RustBPETokenizer.train_from_iterator(text_iterator(), vocab_size)
train_time = time.time() - t0
if stats["chars"] == 0:
    sys.exit(f"no training text found in {data_dir}: run `python -m nanochat.dataset` first")

tokenizer.save(output_dir, metadata={"data_dir": data_dir, "max_chars": max_chars, "doc_cap": doc_cap,
                                     "train_docs": stats["docs"], "train_chars": stats["chars"],
                                     "requested_vocab_size": vocab_size})
print(f"trained in {train_time:.1f}s on {stats['chars']:,} chars ({stats['docs']:,} docs) from {data_dir}")
print(f"vocab size {tokenizer.get_vocab_size():,} (requested {vocab_size:,}; "
      f"{len(tokenizer.get_special_tokens())} special tokens); saved to {output_dir}")

# ----------------------------------------------------------------------------
# Sanity: reload from disk and round-trip a mixed-language sample.
import torch

reloaded = RustBPETokenizer.from_directory(output_dir)
sample = "Hello world! The year 2025 has 365 days.\n\tdef f(x): return x ** 2\n你好，世界！今天天气很好。🙂"
ids = reloaded.encode(sample)
assert ids == tokenizer.encode(sample), "reloaded tokenizer encodes differently"
assert reloaded.decode(ids) == sample, "round trip failed"
token_bytes = torch.load(os.path.join(output_dir, "token_bytes.pt"), weights_only=True)
assert token_bytes.shape == (tokenizer.get_vocab_size(),)
nonzero = token_bytes[token_bytes > 0].float()
print(f"round trip ok: {len(sample.encode('utf-8'))} bytes -> {len(ids)} tokens; "
      f"token bytes min {int(nonzero.min())} max {int(nonzero.max())} mean {nonzero.mean():.2f}")

from nanochat import report

report.log_section("Tokenizer training", config=config, metrics={
    "vocab size": tokenizer.get_vocab_size(), "special tokens": len(tokenizer.get_special_tokens()),
    "train documents": stats["docs"], "train characters": stats["chars"], "train seconds": round(train_time, 2),
    "bytes per token (round-trip sample)": round(len(sample.encode("utf-8")) / len(ids), 3)})
