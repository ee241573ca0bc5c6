"""
Writing the pretraining corpus (nanochat/dataset.py reads it): (source, text) documents streamed
in, parquet shards out, in memory that does not grow with the input: a 2 GB JSONL builds in
257 MB (README: Performance).

  - duplicates: exact, by dedup.text_key (whitespace collapsed), in a KeySet: 8 bytes a document;
  - val split: per source, val_target(n) documents of small key: a max-heap per source (at most
    VAL_MAX_DOCS each) keeps the smallest keys while the stream passes, sending the largest to
    train as the target allows (so the count is exact and the same input gives the same split);
  - shuffle: train documents wait in a ShuffleBuffer of SHUFFLE_CHARS characters and leave in
    random order into row groups of ROW_GROUP_DOCS, shards of about SHARD_CHARS; the shards are
    then named in a shuffled order. Documents further apart in the input than the window meet only
    at shard granularity: the trade for not holding the corpus in memory.

Every build goes to a temp dir beside the target and is renamed into place at the end, so an
error never leaves a half-written shard or touches an existing corpus.
"""
import contextlib
import heapq
import json
import os
import random
import re
import shutil
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import DataError
from nanochat.dedup import KeySet, text_key

ROW_GROUP_DOCS = 1024      # documents per parquet row group (the unit of DDP sharding)
SHARD_CHARS = 16_000_000   # about this many characters per train shard
VAL_FRACTION = 0.01        # held-out fraction of each source's documents...
VAL_MIN_DOCS = 5           # ...but at least this many (and at most half of the source)
VAL_MAX_DOCS = 10_000      # ...and at most this many (plenty for a loss estimate; the val split is held in memory)
SHUFFLE_CHARS = 64_000_000 # the train documents are shuffled within a window of this many characters
SEED = 42                  # fixed shuffle: the same inputs always give the same shards
_CJK = re.compile(r"[\u3400-\u9fff]")


SCHEMA = pa.schema([("text", pa.string()), ("source", pa.string())])


def val_target(n, val_fraction):
    """Val documents of a source of n: val_fraction of them, at least VAL_MIN_DOCS, at most half and
    VAL_MAX_DOCS. Grows by at most 1 with n, which keeps the streaming split exact (see build)."""
    return min(max(VAL_MIN_DOCS, round(val_fraction * n)), n // 2, VAL_MAX_DOCS)


class ShuffleBuffer:
    """A streaming shuffle: documents wait here and, once more than max_chars characters wait, a
    random one leaves for each that arrives; flush() lets the rest out in random order."""

    def __init__(self, rng, max_chars, emit):
        self.rng, self.max_chars, self.emit, self.items, self.chars = rng, max_chars, emit, [], 0

    def add(self, doc):
        self.items.append(doc)
        self.chars += len(doc[1])
        while self.chars > self.max_chars:
            j = self.rng.randrange(len(self.items))
            self.items[j], self.items[-1] = self.items[-1], self.items[j]
            self._leave(self.items.pop())

    def _leave(self, doc):
        self.chars -= len(doc[1])
        self.emit(doc)

    def flush(self):
        self.rng.shuffle(self.items)
        for doc in self.items:
            self._leave(doc)
        self.items = []


def write_row_group(writer, docs):
    writer.write_table(pa.table({"text": [t for _, t in docs], "source": [s for s, _ in docs]}, schema=SCHEMA))


class ShardWriter:
    """(source, text) -> row groups of ROW_GROUP_DOCS -> part files of about SHARD_CHARS, written as
    they fill; finish() names the parts train_XXXXX.parquet in a shuffled order."""

    def __init__(self, directory, rng):
        self.directory, self.rng, self.rows, self.parts, self.writer, self.chars, self.docs = directory, rng, [], [], None, 0, 0

    def add(self, doc):
        self.rows.append(doc)
        if len(self.rows) == ROW_GROUP_DOCS:
            self._write_rows()

    def _write_rows(self):
        if self.writer is None:
            self.parts.append(os.path.join(self.directory, f"part_{len(self.parts):05d}.parquet"))
            self.writer = pq.ParquetWriter(self.parts[-1], SCHEMA, compression="zstd")
        write_row_group(self.writer, self.rows)
        self.chars, self.docs, self.rows = self.chars + sum(len(t) for _, t in self.rows), self.docs + len(self.rows), []
        if self.chars >= SHARD_CHARS:
            self._close_part()

    def _close_part(self):
        self.writer.close()
        with open(self.parts[-1], "rb") as f:
            os.fsync(f.fileno())
        self.writer, self.chars = None, 0

    def finish(self):
        if self.rows:
            self._write_rows()
        if self.writer is not None:
            self._close_part()
        # the shuffle buffer mixes documents only within a window: shuffling the shards spreads the
        # windows (say, two files given one after the other) over the whole run
        for i, shard in enumerate(self.rng.sample(range(len(self.parts)), len(self.parts))):
            os.rename(self.parts[i], os.path.join(self.directory, f"train_{shard:05d}.parquet"))


def write_shard(path, docs):
    with pq.ParquetWriter(path, SCHEMA, compression="zstd") as writer:
        for i in range(0, len(docs), ROW_GROUP_DOCS):
            write_row_group(writer, docs[i:i + ROW_GROUP_DOCS])
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def staged_dir(target):
    """A temp dir beside target, renamed into its place on success and removed on any error; an
    existing target is replaced only by that final rename (and removed after it)."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.tmp-")
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp makes it private; the corpus is an ordinary directory
    try:
        yield tmp_dir
        old = target + f".old-{os.getpid()}"
        if os.path.exists(target):
            os.rename(target, old)
        os.rename(tmp_dir, target)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def build(docs, target, val_fraction=VAL_FRACTION, cleaning=None):
    """Write (source, text) docs, streamed from any iterable, as shards into target, atomically, in
    memory that does not grow with the input (bar 8 bytes a document for the duplicate keys):
    exact duplicates dropped (dedup.KeySet); each source's val split is the val_target documents
    with the smallest content key (a heap per source: stable, at most VAL_MAX_DOCS); the train
    documents pass a ShuffleBuffer of SHUFFLE_CHARS on their way into the shards. `cleaning`:
    {source: cleaning report summary} for the stats. Returns the per-source stats."""
    seen, stats, val = KeySet(), {}, {}
    rng = random.Random(SEED)
    with staged_dir(target) as tmp_dir:
        shards = ShardWriter(tmp_dir, rng)
        shuffle = ShuffleBuffer(rng, SHUFFLE_CHARS, shards.add)
        for batch in _batches(docs, ROW_GROUP_DOCS):
            keys = [text_key(text) for _, text in batch]
            for (source, text), key, new in zip(batch, keys, seen.add_new(keys)):
                if not new:
                    continue
                s = stats.setdefault(source, {"documents": 0, "characters": 0, "cjk_characters": 0, "utf8_bytes": 0})
                s["documents"] += 1
                s["characters"] += len(text)
                s["cjk_characters"] += 0 if text.isascii() else len(_CJK.findall(text))
                s["utf8_bytes"] += len(text.encode("utf-8"))
                heap = val.setdefault(source, [])
                heapq.heappush(heap, (-key, text))  # a max-heap: the largest key leaves for train first
                if len(heap) > val_target(s["documents"], val_fraction):
                    shuffle.add((source, heapq.heappop(heap)[1]))
        shuffle.flush()
        shards.finish()
        val_docs = sorted((-key, source, text) for source, heap in val.items() for key, text in heap)
        if not shards.docs or not val_docs:
            raise DataError(f"too few documents ({shards.docs + len(val_docs)}): need at least 2 for a train/val split")
        write_shard(os.path.join(tmp_dir, "val_00000.parquet"), [(source, text) for _, source, text in val_docs])
        for source, s in stats.items():
            s["val_docs"] = len(val[source])
            s["train_docs"] = s["documents"] - s["val_docs"]
            if cleaning and source in cleaning:
                s["cleaning"] = cleaning[source]
        with open(os.path.join(tmp_dir, "dataset_stats.json"), "w") as f:
            json.dump(stats, f, indent=2, ensure_ascii=False)
    return stats


def _batches(items, n):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
