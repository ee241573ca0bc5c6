"""
Download throughput against a loopback mirror in fineweb-edu's layout: nanochat.download with 1 and
`workers` parallel connections, beside a plain sequential urllib download of the same shards (what
the downloader did before: one shard after another, no checks). Twice: with the server unthrottled
(loopback, so CPU-bound on both ends) and with each connection capped at `connection_mbps` MB/s,
the way a CDN serves one connection (where parallel connections pay off).

    python -m scripts.bench_download
    python -m scripts.bench_download --num_shards=32 --shard_mb=16 --workers=16 --connection_mbps=20
"""
import os
import sys

if not __package__:  # run as a file: python scripts/bench_download.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

num_shards = 16
shard_mb = 8            # incompressible text, so the file is about this size
workers = 8
connection_mbps = 25.0  # the capped run's per-connection rate

from nanochat.configurator import configure
config = configure(globals())

import base64
import io
import shutil
import tempfile
import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat import download

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from shard_server import ShardServer  # noqa: E402  (the tests' loopback mirror)

root = tempfile.mkdtemp(prefix="bench_download-")
mirror = os.path.join(root, "mirror")
os.makedirs(mirror)
docs = max(1, shard_mb * 1024 * 1024 // 4096)
for i in range(num_shards):  # random bytes as base64: zstd cannot shrink them, so MB on disk = MB on the wire
    texts = [base64.b64encode(os.urandom(3000)).decode() for _ in range(docs)]
    pq.write_table(pa.table({"text": texts}), os.path.join(mirror, f"shard_{i:05d}.parquet"), row_group_size=256)
total_mb = sum(os.path.getsize(os.path.join(mirror, f)) for f in os.listdir(mirror)) / 1e6
print(f"{num_shards} shards, {total_mb:.1f} MB in all, {os.cpu_count()} CPU cores")


def sequential(url, out):
    """The old way: one shard after another, straight to disk."""
    os.makedirs(out)
    for i in range(num_shards):
        with urllib.request.urlopen(f"{url}/shard_{i:05d}.parquet", timeout=60) as r, \
                open(os.path.join(out, f"shard_{i:05d}.parquet"), "wb") as f:
            shutil.copyfileobj(r, f)


def ours(url, out, n):
    download.download({"fineweb-edu": 1.0}, {"fineweb-edu": num_shards}, out, base_url=url, workers=n)


rows = []
for label, rate in [("unthrottled loopback", 0.0), (f"{connection_mbps:g} MB/s per connection", connection_mbps * 1e6)]:
    with ShardServer(mirror, rate=rate) as server:
        for name, run in [("sequential urllib", lambda out: sequential(server.url, out)),
                          ("nanochat.download, 1 worker", lambda out: ours(server.url, out, 1)),
                          (f"nanochat.download, {workers} workers", lambda out: ours(server.url, out, workers))]:
            out = tempfile.mkdtemp(dir=root)
            shutil.rmtree(out)
            sys.stdout, saved = io.StringIO(), sys.stdout  # the progress lines would drown the table
            t0 = time.time()
            try:
                run(out)
            finally:
                sys.stdout = saved
            seconds = time.time() - t0
            rows.append((label, name, total_mb / seconds))
            shutil.rmtree(out)
shutil.rmtree(root)

print(f"\n{'server':<28} {'downloader':<32} {'MB/s':>8} {'vs sequential':>14}")
for label, name, mbps in rows:
    base = next(m for l, n, m in rows if l == label and n == "sequential urllib")
    print(f"{label:<28} {name:<32} {mbps:>8.1f} {mbps / base:>13.2f}x")
