"""
Web-scale pretraining text, for machines with a network: parquet shards downloaded as they are
published and read in place by the loader (never rewritten), one folder per source:

    <out>/mixture.json                        {"sources": {name: weight, ...}, "shards": {name: n}}
    <out>/fineweb-edu/shard_00000.parquet     shard 0 of every source is its val split
    <out>/fineweb-edu/shard_00001.parquet ... the rest are train
    <out>/fineweb-edu-zh/shard_00000.parquet ...

A shard counts only once it is whole: it is streamed to a temp file, checked (it opens as parquet
and has a string `text` column, and as many bytes arrived as the server announced) and renamed
into place. So a re-run fetches exactly what is missing or broken, a failure at shard 200 keeps
the 199 before it, and a killed run leaves only temp files, which the next run removes.
Dropped connections, timeouts, 429 and 5xx are retried with exponential backoff; 401/403/404 stop
the download with the URL in the message; a server that does not answer fails in seconds.
"""
import fcntl
import json
import math
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from http.client import HTTPException

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import atomic_open

# Where each source lives and what one shard holds (for planning: how many shards a token budget
# needs). The sizes are estimates from the datasets' documentation, the token ratios from nanochat's
# 65k tokenizer (English) and a bilingual BPE of the same size (Chinese); the plan says "about".
WEB_SOURCES = {
    "fineweb-edu": {
        # karpathy's repack of FineWeb-Edu 100BT, globally shuffled, 1,823 shards of ~250M characters
        # (~95 MB zstd parquet, row groups of 1024 documents): the shards nanochat trains on.
        "url": "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{:05d}.parquet",
        "max_shards": 1823, "chars_per_shard": 250e6, "chars_per_token": 4.8, "mb_per_shard": 100,
        "license": "ODC-By 1.0 (FineWeb-Edu, HuggingFaceFW)",
    },
    "fineweb-edu-zh": {
        # OpenCSG's Chinese FineWeb-Edu v2: 188M documents (~420B tokens) in 560 files of ~970 MB;
        # not shuffled across files, so a few files are a narrower sample than the same text of fineweb-edu.
        "url": "https://huggingface.co/datasets/opencsg/chinese-fineweb-edu-v2/resolve/main/data/{:05d}.parquet",
        "max_shards": 560, "chars_per_shard": 1.0e9, "chars_per_token": 1.5, "mb_per_shard": 970,
        "license": "Apache-2.0 (opencsg/chinese-fineweb-edu-v2)",
    },
}
MIRROR_LAYOUT = "shard_{:05d}.parquet"  # --base_url: shard i is URL/shard_{i:05d}.parquet (fineweb-edu's layout)
RETRIES = 6              # attempts per shard before the download fails
RETRY_WAIT = 1.0         # seconds before the first retry; doubles each time (capped at 60)
FATAL_HTTP = (401, 403, 404, 410)  # the URL is wrong or forbidden: retrying cannot help
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """The download cannot go on; the message names the URL (and keeps every shard already done)."""


class RetryableError(Exception):
    pass


def shard_name(i):
    return f"shard_{i:05d}.parquet"


def shard_url(source, i, base_url=None, several=False):
    """The URL of shard i of a source. With a mirror (base_url), fineweb-edu's layout under it, and
    under base_url/<source>/ when several sources are fetched at once."""
    if base_url:
        root = base_url.rstrip("/") + (f"/{source}" if several else "")
        return f"{root}/{MIRROR_LAYOUT.format(i)}"
    return WEB_SOURCES[source]["url"].format(i)


def parse_mixture(spec):
    """'fineweb-edu:0.8,fineweb-edu-zh:0.2' -> {name: weight} summing to 1 (a bare name weighs 1)."""
    weights = {}
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        if name not in WEB_SOURCES:
            raise ValueError(f"unknown web source {name!r}; known: {', '.join(WEB_SOURCES)}")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"{item!r}: the weight after ':' must be a number") from None
        if weights[name] <= 0:
            raise ValueError(f"{item!r}: the weight must be > 0")
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


def tokens_per_shard(source):
    s = WEB_SOURCES[source]
    return s["chars_per_shard"] / s["chars_per_token"]


def shards_for_tokens(mixture, tokens):
    """{source: shards} that hold `tokens` train tokens in the mixture's proportions, plus the val shard."""
    return {name: 1 + max(1, math.ceil(tokens * w / tokens_per_shard(name))) for name, w in mixture.items()}


# -----------------------------------------------------------------------------
# One shard

def check_shard(path):
    """None if path is a readable parquet shard with a string `text` column, else why not."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        return f"not a readable parquet file ({str(e).splitlines()[0][:120]})"
    schema = pf.schema_arrow
    if "text" not in schema.names:
        return f"no `text` column (columns: {', '.join(schema.names)})"
    if not (pa.types.is_string(schema.field("text").type) or pa.types.is_large_string(schema.field("text").type)):
        return f"the `text` column holds {schema.field('text').type}, not strings"
    if pf.metadata.num_rows == 0:
        return "no rows"
    return None


def _open(url, timeout, extra_headers=None):
    request = urllib.request.Request(url, headers={"User-Agent": "nanochat", **(extra_headers or {})})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code in FATAL_HTTP:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        if e.code == 429 or e.code >= 500:
            raise RetryableError(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, HTTPException, OSError) as e:  # refused, reset, DNS, timeout
        raise RetryableError(str(getattr(e, "reason", e))) from None


def fetch_shard(url, dest, progress, stop, timeout=30.0):
    """Download url to dest through a temp file beside it; retry what a retry can fix."""
    tmp, retries = f"{dest}.tmp{os.getpid()}", RETRIES
    try:
        for attempt in range(retries):
            if stop.is_set():
                return
            try:
                got = 0
                with _open(url, timeout) as response, open(tmp, "wb") as f:
                    expected = response.headers.get("Content-Length")
                    while not stop.is_set():
                        block = response.read(CHUNK)
                        if not block:
                            break
                        f.write(block)
                        got += len(block)
                        progress.add_bytes(len(block))
                    if stop.is_set():
                        return
                    if expected is not None and got != int(expected):
                        raise RetryableError(f"connection dropped after {got:,} of {int(expected):,} bytes")
                    f.flush()
                    os.fsync(f.fileno())
                problem = check_shard(tmp)
                if problem:
                    raise RetryableError(problem)
                os.replace(tmp, dest)
                progress.shard_done()
                return
            except (RetryableError, HTTPException, OSError) as e:  # OSError: a read that timed out or was reset
                progress.add_bytes(-got)
                if attempt == retries - 1:
                    raise DownloadError(f"{url}: {e} (gave up after {retries} attempts)") from None
                wait_s = min(60.0, RETRY_WAIT * 2 ** attempt)
                progress.log(f"{os.path.basename(dest)}: {e}; retry {attempt + 1}/{retries - 1} in {wait_s:.1f}s")
                stop.wait(wait_s)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def probe(url, timeout=10.0):
    """None if the server answers for url, else a one-line reason (no retries: for failing fast)."""
    try:
        with _open(url, timeout, {"Range": "bytes=0-3"}) as response:
            response.read(4)
        return None
    except DownloadError as e:
        return str(e)
    except RetryableError as e:
        if str(e).startswith("HTTP 5"):
            return None  # it answered; the download's retries deal with a flaky server
        return f"{url}: no answer ({e})"


# -----------------------------------------------------------------------------
# Progress: shards done/total, MB/s, ETA

def hms(seconds):
    if seconds is None:
        return "n/a"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total_shards, already_done, out=None):
        self.total, self.done, self.out = total_shards, already_done, out or sys.stdout
        self.start_done, self.bytes, self.t0 = already_done, 0, time.time()
        self.lock = threading.Lock()

    def add_bytes(self, n):
        with self.lock:
            self.bytes += n

    def log(self, message):
        with self.lock:
            print(message, file=self.out, flush=True)

    def line(self):
        elapsed = max(time.time() - self.t0, 1e-6)
        rate = self.bytes / elapsed
        fetched = self.done - self.start_done
        left = self.total - self.done
        eta = left * (self.bytes / fetched) / rate if fetched and rate else None  # shards left x mean shard size
        return (f"shards {self.done}/{self.total} | {self.bytes / 1e6:,.1f} MB | {rate / 1e6:.1f} MB/s | "
                f"elapsed {hms(elapsed)} | eta {hms(eta)}")

    def shard_done(self):
        with self.lock:
            self.done += 1
            print(self.line(), file=self.out, flush=True)


# -----------------------------------------------------------------------------
# Many shards

def _acquire_lock(out_dir):
    handle = open(os.path.join(out_dir, ".download.lock"), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DownloadError(f"another download is writing into {out_dir}; wait for it to finish") from None
    return handle


def plan_missing(out_dir, num_shards, log=print):
    """[(source, i)] of the shards not yet on disk whole; a broken one is named, removed and listed."""
    missing = []
    for source, n in num_shards.items():
        folder = os.path.join(out_dir, source)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # we hold the lock: any temp file is a killed run's leftover
            if ".tmp" in name:
                os.remove(os.path.join(folder, name))
        for i in range(n):
            path = os.path.join(folder, shard_name(i))
            if os.path.exists(path):
                problem = check_shard(path)
                if problem is None:
                    continue
                log(f"{path}: {problem}; fetching it again")
                os.remove(path)
            missing.append((source, i))
    return missing


def download(mixture, num_shards, out_dir, base_url=None, workers=8, timeout=30.0):
    """Fetch shards 0..n-1 of each source of mixture ({name: weight}) into out_dir/<name>/ and record
    the mixture in out_dir/mixture.json. Returns the number of shards fetched."""
    out = sys.stdout
    for name, n in num_shards.items():
        limit = None if base_url else WEB_SOURCES[name]["max_shards"]  # a mirror may hold more
        if n < 2 or (limit and n > limit):
            raise ValueError(f"{name}: --num_shards must be in 2..{limit or 'any'} (one val shard + at least one "
                             f"train shard), got {n}")
    os.makedirs(out_dir, exist_ok=True)
    lock = _acquire_lock(out_dir)
    try:
        with atomic_open(os.path.join(out_dir, "mixture.json"), "w", encoding="utf-8") as f:
            json.dump({"sources": mixture, "shards": num_shards}, f, indent=2)
        missing = plan_missing(out_dir, num_shards, log=lambda m: print(m, file=out, flush=True))
        total = sum(num_shards.values())
        print(f"{out_dir}: {total - len(missing)}/{total} shards present, fetching {len(missing)} "
              f"with {min(workers, max(1, len(missing)))} workers", file=out, flush=True)
        if not missing:
            return 0
        several = len(mixture) > 1
        urls = {(s, i): shard_url(s, i, base_url, several) for s, i in missing}
        for source in num_shards:  # fail in seconds, not after the retries, when a source cannot be reached
            first = next(((s, i) for s, i in missing if s == source), None)
            problem = first and probe(urls[first], timeout=min(timeout, 10.0))
            if problem:
                raise DownloadError(problem)
        progress, stop = Progress(total, total - len(missing), out), threading.Event()
        pool = ThreadPoolExecutor(max_workers=workers)
        futures = [pool.submit(fetch_shard, urls[(s, i)], os.path.join(out_dir, s, shard_name(i)),
                               progress, stop, timeout) for s, i in missing]
        try:
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in finished if f.exception() is not None]
            if errors:
                raise errors[0]
        finally:  # an error or Ctrl-C: stop the other workers, keep the shards already whole
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        return len(missing)
    finally:
        lock.close()


def reachable(mixture, base_url=None, timeout=5.0):
    """None if shard 0 of every source answers, else the first reason it does not."""
    for source in mixture:
        problem = probe(shard_url(source, 0, base_url, len(mixture) > 1), timeout)
        if problem:
            return problem
    return None


def read_mixture(data_dir):
    """{name: weight} of a downloaded data dir, or None if data_dir holds no download."""
    path = os.path.join(data_dir, "mixture.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["sources"]
