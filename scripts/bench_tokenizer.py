"""
Tokenizer benchmark (not a test): our rustbpe against HuggingFace `tokenizers`, tiktoken and
karpathy's `rustbpe` 0.1.0 from PyPI, on the same corpus, vocab size and split regex, in one run.

    python -m scripts.bench_tokenizer                      # >= 100 MB at vocab 32768 (slow)
    nice -n 10 python -m scripts.bench_tokenizer --corpus_mb=5 --vocab_size=4096
    python -m scripts.bench_tokenizer --memory_gb=1        # only: peak RSS training on 1 GB streamed

Prints training time (ratios: peer time / ours), encode throughput in MB/s for one long
string and for a batch of documents (ratios: ours / peer), checks that our ids equal
tiktoken's (built from our ranks), and the peak RSS of our training in a child process.
PyPI's rustbpe clashes with ours by module name, so it lives in its own venv
(<base>/bench_venvs/rustbpe_pypi, created on first use) and runs as a subprocess that reads
the same corpus file.
"""
import os
import sys

if not __package__:  # run as a file: python scripts/bench_tokenizer.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

vocab_size = 32768       # 256 byte tokens + merges, as rustbpe counts it (no specials)
corpus_mb = 100          # train and encode on at least this many MB (UTF-8) of shard text
data_dir = ""            # "" = <base>/base_data if it holds corpus_mb, else <base>/bench_data
sources = "default,xsum,sharegpt,bigbench"  # what `python -m nanochat.dataset` builds bench_data from
single_mb = 10           # size of the one-long-string encode test (HF's single encode is memory-hungry)
encode_repeats = 2       # best of this many timed runs per encode measurement
pypi_rustbpe = True      # compare with karpathy's rustbpe 0.1.0 (own venv; needs PyPI once)
hf = True                # compare with HuggingFace tokenizers
memory_gb = 0.0          # > 0: only measure peak RSS of our training on this many GB, streamed
seed = 0

from nanochat.configurator import configure
config = configure(globals())

import json
import platform
import subprocess
import tempfile
import time

import rustbpe
import tiktoken

from nanochat.common import get_base_dir
from nanochat.dataset import list_parquet_files, parquets_iter_batched
from nanochat.tokenizer import SPLIT_PATTERN
from scripts.reference_tokenizers import train_hf_bpe

base_dir = get_base_dir()
target_bytes = int(corpus_mb * 1e6)


def shard_bytes(d):
    """UTF-8 bytes of the train split in d (counting stops at target_bytes)."""
    total = 0
    for batch in parquets_iter_batched("train", data_dir=d):
        total += sum(len(t.encode("utf-8")) for t in batch)
        if total >= target_bytes:
            break
    return total


if not data_dir:
    data_dir = os.path.join(base_dir, "base_data")
    if shard_bytes(data_dir) < target_bytes:  # --memory_gb too: more distinct text than one small corpus
        data_dir = os.path.join(base_dir, "bench_data")
        if shard_bytes(data_dir) < target_bytes:
            cmd = [sys.executable, "-m", "nanochat.dataset", f"--sources={sources}", f"--output_dir={data_dir}"]
            print(f"default corpus < {corpus_mb} MB; building a bigger one: {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True)
if not list_parquet_files("train", data_dir=data_dir):
    sys.exit(f"no train shards in {data_dir}: run `python -m nanochat.dataset` first")

print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
      f"tiktoken {tiktoken.__version__}")

# ----------------------------------------------------------------------------
# Peak RSS of our training, measured in a fresh child process that streams documents from
# the shards (nothing held but rustbpe's distinct-chunk counts). VmHWM is the kernel's
# high-water mark of resident memory; ru_maxrss is the fallback off Linux.
STREAM_TRAIN = r'''
import json, os, random, resource, sys, time
import pyarrow.parquet as pq
import rustbpe  # nothing from nanochat (it pulls in torch): RSS here is Python + pyarrow + rustbpe
files, total_bytes, vocab_size, pattern, shuffle, seed = json.loads(sys.argv[1])

def peak_rss_mb():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20

groups = [(p, rg) for p in files for rg in range(pq.ParquetFile(p).num_row_groups)]
stats = {"docs": 0, "bytes": 0, "passes": 0}
def stream():
    # cycle the corpus until total_bytes; with shuffle, every pass visits the row groups, and
    # the docs inside each, in a new random order. Only one row group is held at a time.
    rng = random.Random(seed)
    while True:
        stats["passes"] += 1
        order = list(groups)
        if shuffle:
            rng.shuffle(order)
        for path, rg in order:
            batch = pq.ParquetFile(path).read_row_group(rg, columns=["text"]).column("text").to_pylist()
            if shuffle:
                rng.shuffle(batch)
            for doc in batch:
                stats["docs"] += 1
                stats["bytes"] += len(doc.encode("utf-8"))
                yield doc
                if stats["bytes"] >= total_bytes:
                    return

base = peak_rss_mb()
t0 = time.time()
tok = rustbpe.Tokenizer()
tok.train_from_iterator(stream(), vocab_size, pattern=pattern)
print(json.dumps({"seconds": time.time() - t0, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": base,
                  "vocab": tok.vocab_size, **stats}))
'''


def stream_train_rss(total_bytes, shuffle):
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo_root] + [p for p in sys.path if p]))
    out = subprocess.run([sys.executable, "-c", STREAM_TRAIN,
                          json.dumps([list_parquet_files("train", data_dir=data_dir), total_bytes, vocab_size,
                                      SPLIT_PATTERN, shuffle, seed])],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"training child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if memory_gb > 0:
    r = stream_train_rss(int(memory_gb * 1e9), shuffle=True)
    print(f"memory: trained vocab {r['vocab']} on {r['bytes'] / 1e9:.2f} GB ({r['docs']:,} docs) streamed from "
          f"{data_dir}: the corpus cycled {r['passes']} time(s), each pass's row groups and the docs within "
          f"them shuffled, in {r['seconds']:.0f}s")
    print(f"memory: peak RSS {r['peak_rss_mb']:.0f} MB (VmHWM of the child process; {r['rss_before_mb']:.0f} MB "
          f"before training). Note: repeated passes add no new distinct chunks, so the chunk table is "
          f"that of one pass of the corpus.")
    sys.exit(0)

# ----------------------------------------------------------------------------
# The corpus: whole documents from the shards until corpus_mb.
docs, n_bytes = [], 0
for batch in parquets_iter_batched("train", data_dir=data_dir):
    for doc in batch:
        docs.append(doc)
        n_bytes += len(doc.encode("utf-8"))
        if n_bytes >= target_bytes:
            break
    if n_bytes >= target_bytes:
        break
if n_bytes < target_bytes:
    sys.exit(f"{data_dir} holds only {n_bytes / 1e6:.1f} MB < corpus_mb={corpus_mb}")
single = "\n".join(docs)
single = single.encode("utf-8")[: int(single_mb * 1e6)].decode("utf-8", errors="ignore")
single_bytes = len(single.encode("utf-8"))
cjk = sum(sum("\u4e00" <= c <= "\u9fff" for c in d) for d in docs)
print(f"corpus: {len(docs):,} docs, {n_bytes / 1e6:.1f} MB UTF-8, {cjk / 1e6:.2f}M CJK chars, from {data_dir}; "
      f"vocab {vocab_size}; single string {single_bytes / 1e6:.1f} MB")


def best_time(fn, repeats=encode_repeats):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


results = {}  # name -> {"train_s", "single_mbs", "batch_mbs"}

# ----------------------------------------------------------------------------
# Ours
t0 = time.perf_counter()
ours = rustbpe.Tokenizer()
ours.train_from_iterator(iter(docs), vocab_size, pattern=SPLIT_PATTERN)
train_s = time.perf_counter() - t0
t_single, ours_single = best_time(lambda: ours.encode(single))
t_batch, ours_batch = best_time(lambda: ours.batch_encode(docs))
results["rustbpe (ours)"] = {"train_s": train_s, "single_mbs": single_bytes / 1e6 / t_single,
                             "batch_mbs": n_bytes / 1e6 / t_batch}
print(f"ours: trained in {train_s:.1f}s", flush=True)

# tiktoken built from our ranks: the reference for ids, and a speed peer for encoding
enc = tiktoken.Encoding(name="bench", pat_str=SPLIT_PATTERN, mergeable_ranks=dict(ours.get_mergeable_ranks()),
                        special_tokens={})
t_single, tk_single = best_time(lambda: enc.encode_ordinary(single))
t_batch, tk_batch = best_time(lambda: enc.encode_ordinary_batch(docs))
results["tiktoken"] = {"train_s": None, "single_mbs": single_bytes / 1e6 / t_single,
                       "batch_mbs": n_bytes / 1e6 / t_batch}
same_ids = ours_single == tk_single and ours_batch == tk_batch
n_diff = sum(a != b for a, b in zip(ours_batch, tk_batch))
print(f"ids: ours == tiktoken on the bench corpus: {'yes' if same_ids else f'NO ({n_diff} docs differ)'} "
      f"({sum(map(len, ours_batch)):,} tokens)", flush=True)
del tk_batch, tk_single, ours_single

# ----------------------------------------------------------------------------
# HuggingFace tokenizers: BpeTrainer, the same split regex, then ByteLevel
if hf:
    t0 = time.perf_counter()
    hf_tok = train_hf_bpe(iter(docs), vocab_size, pattern=SPLIT_PATTERN)
    train_s = time.perf_counter() - t0
    batch_fn = getattr(hf_tok, "encode_batch_fast", hf_tok.encode_batch)  # no offsets where available
    t_single, _ = best_time(lambda: hf_tok.encode(single, add_special_tokens=False))
    t_batch, _ = best_time(lambda: batch_fn(docs, add_special_tokens=False))
    results["HF tokenizers"] = {"train_s": train_s, "single_mbs": single_bytes / 1e6 / t_single,
                                "batch_mbs": n_bytes / 1e6 / t_batch}
    print(f"HF tokenizers: trained in {train_s:.1f}s (vocab {hf_tok.get_vocab_size()})", flush=True)
    del hf_tok

# ----------------------------------------------------------------------------
# karpathy's rustbpe 0.1.0 from PyPI, in its own venv, on the same corpus file
PYPI_CHILD = r'''
import json, sys, time
import rustbpe
corpus_path, single_bytes_n, vocab_size, pattern, repeats = json.loads(sys.argv[1])
with open(corpus_path, encoding="utf-8") as f:
    docs = [json.loads(line) for line in f]
single = "\n".join(docs).encode("utf-8")[:single_bytes_n].decode("utf-8", errors="ignore")
def best(fn):
    b, r = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter(); r = fn(); b = min(b, time.perf_counter() - t0)
    return b, r
t0 = time.perf_counter()
tok = rustbpe.Tokenizer()
tok.train_from_iterator(iter(docs), vocab_size, pattern=pattern)
train_s = time.perf_counter() - t0
t_single, _ = best(lambda: tok.encode(single))
t_batch, _ = best(lambda: tok.batch_encode(docs))
ranks = sorted(tok.get_mergeable_ranks(), key=lambda x: x[1])
print(json.dumps({"train_s": train_s, "t_single": t_single, "t_batch": t_batch,
                  "ranks": [[b.hex(), r] for b, r in ranks]}))
'''
pypi_note = None
if pypi_rustbpe:
    venv = os.path.join(base_dir, "bench_venvs", "rustbpe_pypi")
    py = os.path.join(venv, "Scripts" if os.name == "nt" else "bin", "python")
    try:
        if not os.path.exists(py):
            print(f"creating {venv} with rustbpe==0.1.0 from PyPI ...", flush=True)
            subprocess.run([sys.executable, "-m", "venv", venv], check=True, capture_output=True, text=True)
            subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "rustbpe==0.1.0"],
                           check=True, capture_output=True, text=True)
        fd, corpus_path = tempfile.mkstemp(prefix="bench_corpus_", suffix=".jsonl", dir=base_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for d in docs:
                    f.write(json.dumps(d, ensure_ascii=False) + "\n")
            clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
            out = subprocess.run([py, "-c", PYPI_CHILD, json.dumps([corpus_path, single_bytes, vocab_size,
                                                                    SPLIT_PATTERN, encode_repeats])],
                                 capture_output=True, text=True, check=True, env=clean_env)
        finally:
            os.remove(corpus_path)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results["rustbpe 0.1.0 (PyPI)"] = {"train_s": r["train_s"], "single_mbs": single_bytes / 1e6 / r["t_single"],
                                           "batch_mbs": n_bytes / 1e6 / r["t_batch"]}
        theirs = [(bytes.fromhex(b), rank) for b, rank in r["ranks"]]
        same = theirs == sorted(ours.get_mergeable_ranks(), key=lambda x: x[1])
        print(f"rustbpe 0.1.0 (PyPI): trained in {r['train_s']:.1f}s; same merges as ours: {'yes' if same else 'no'}",
              flush=True)
    except subprocess.CalledProcessError as e:
        cmd = " ".join(e.cmd[:3]) if e.cmd[1] != "-c" else f"{e.cmd[0]} -c <benchmark>"
        pypi_note = f"rustbpe 0.1.0 (PyPI) skipped: `{cmd}` exited {e.returncode}: {(e.stderr or '').strip()[-400:]}"
        print(pypi_note, flush=True)
    except OSError as e:
        pypi_note = f"rustbpe 0.1.0 (PyPI) skipped: {e}"
        print(pypi_note, flush=True)

# ----------------------------------------------------------------------------
# Peak RSS of our training (child process, streaming the same corpus from the shards)
rss = stream_train_rss(n_bytes, shuffle=False)  # the bench corpus: same docs, same order

# ----------------------------------------------------------------------------
# Report
me = results["rustbpe (ours)"]
print()
print(f"{'tokenizer':<22}{'train s':>9}{'ours faster':>13}{'single MB/s':>13}{'ours x':>8}{'batch MB/s':>12}{'ours x':>8}")
for name, r in results.items():
    train_col = f"{r['train_s']:>9.1f}{r['train_s'] / me['train_s']:>12.2f}x" if r["train_s"] else f"{'-':>9}{'-':>13}"
    print(f"{name:<22}{train_col}{r['single_mbs']:>13.1f}{me['single_mbs'] / r['single_mbs']:>7.2f}x"
          f"{r['batch_mbs']:>12.1f}{me['batch_mbs'] / r['batch_mbs']:>7.2f}x")
print("\n'ours faster' = peer's training time / ours; 'ours x' = our throughput / peer's (> 1: ours is faster).")
print(f"single = one {single_bytes / 1e6:.1f} MB string; batch = {len(docs):,} documents, {n_bytes / 1e6:.1f} MB.")
print(f"peak RSS of our training on {rss['bytes'] / 1e6:.1f} MB streamed from the shards: {rss['peak_rss_mb']:.0f} MB "
      f"(VmHWM of a child process; {rss['rss_before_mb']:.0f} MB before training)")
print(f"ids equal to tiktoken's: {'yes' if same_ids else 'NO'}")
if pypi_note:
    print(pypi_note)
