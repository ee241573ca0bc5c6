"""
The cleaning pass's throughput: nanochat.clean_data on a generated pretraining JSONL (real text of
the offline corpus, every document made distinct, `bad_percent` of the lines planted bad: malformed,
missing field, empty, mojibake, duplicate), beside its peer in the same process: a plain
single-process loop of json.loads over the same file (what reading it at all costs).

    python -m scripts.bench_clean                                  # 256 MB, all cores
    python -m scripts.bench_clean --size_mb=2048 --keep=True       # the README's 2 GB file, kept for nanochat.dataset
    python -m scripts.bench_clean --data_path=pretrain_hq.jsonl        # your own file (no generation)
"""
import os
import sys

if not __package__:  # run as a file: python scripts/bench_clean.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

size_mb = 256            # generated file size
bad_percent = 1.0        # planted bad lines, in percent
data_path = ""           # an existing JSONL file instead of a generated one
kind = "pretrain"
workers = os.cpu_count() or 1
out_dir = "/tmp"         # where the generated file and the cleaned output go
keep = False             # keep the generated and cleaned files (e.g. to build shards from them next)

from nanochat.configurator import configure
config = configure(globals())

import json
import random
import resource
import shutil
import tempfile
import time

from nanochat import clean_data
from nanochat.dataset import default_data_dir, parquets_iter_batched


def corpus_pieces(max_chars=2000):
    """Pieces of the offline corpus's documents (English and Chinese), at most max_chars each."""
    pieces = [text[i:i + max_chars] for batch in parquets_iter_batched("train", data_dir=default_data_dir())
              for text in batch for i in range(0, len(text), max_chars)]
    return [p for p in pieces if p.strip()]


def generate(path, size_mb, bad_percent, seed=0):
    """size_mb of {"text": ...} lines; returns the planted bad lines by kind."""
    rng, pieces, planted = random.Random(seed), corpus_pieces(), {}
    bad = [lambda t: '{"text": "' + t[:50].replace("\n", " "),          # malformed JSON
           lambda t: json.dumps({"body": t}, ensure_ascii=False),        # missing field
           lambda t: json.dumps({"text": "   "}),                        # empty
           lambda t: json.dumps({"text": "Ã©Ã¨Ã " * 40}),                 # mojibake
           lambda t: json.dumps({"text": last}, ensure_ascii=False)]     # a duplicate
    written, i, last = 0, 0, "seed text"
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 1e6:
            text = f"{i}. {rng.choice(pieces)}"  # the number makes every document distinct
            if rng.random() < bad_percent / 100:
                k = rng.randrange(len(bad))
                line = bad[k](text)
                planted[k] = planted.get(k, 0) + 1
            else:
                line, last = json.dumps({"text": text}, ensure_ascii=False), text
            f.write(line + "\n")
            written += len(line.encode("utf-8")) + 1
            i += 1
    return planted


report_dir = os.environ["NANOCHAT_REPORT_DIR"] = tempfile.mkdtemp(prefix="bench_clean-report-")  # not the real report card
path = data_path or os.path.join(out_dir, f"bench_clean_{size_mb}mb.jsonl")
if not data_path:
    t0 = time.time()
    planted = generate(path, size_mb, bad_percent)
    print(f"generated {path} in {time.time() - t0:.0f}s: {os.path.getsize(path) / 1e6:,.0f} MB, planted bad lines "
          f"{sum(planted.values()):,} (malformed, missing, empty, mojibake, duplicate: "
          f"{', '.join(str(planted.get(k, 0)) for k in range(5))})")
mb = os.path.getsize(path) / 1e6
print(f"{mb:,.0f} MB, {os.cpu_count()} CPU cores, {workers} workers")

t0 = time.time()  # the peer: read and parse every line, one process, no checks
rows = 0
with open(path, "rb") as f:
    for line in f:
        try:
            json.loads(line)
            rows += 1
        except ValueError:
            pass
peer = mb / (time.time() - t0)
print(f"plain json.loads loop, 1 process: {peer:6.1f} MB/s ({rows:,} rows parse)")

def cpu_seconds():  # this process and its reaped children (the pool's workers, once it is closed)
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


out = os.path.join(out_dir, os.path.basename(clean_data.default_output(path)))
t0, cpu0 = time.time(), cpu_seconds()
clean_data.main([path, f"--kind={kind}", f"--out={out}", f"--workers={workers}"])
ours, cpu = mb / (time.time() - t0), cpu_seconds() - cpu0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"nanochat.clean_data, {workers} workers: {ours:6.1f} MB/s ({ours / peer:.2f}x the plain loop; {mb / cpu:.1f} MB "
      f"per CPU-second, all processes; peak RSS of this process {peak:,.0f} MB, the peer's lines included)")
shutil.rmtree(report_dir)
if not keep:
    for p in ([path] if not data_path else []) + [out, clean_data.report_path(out), clean_data.histogram_path(out)]:
        if os.path.exists(p):
            os.unlink(p)
