"""
Load test for scripts/chat_web.py (not a test: it measures). For each server setting (by default
--max_batch_size=1, one request at a time, and the default continuous batching) it starts one
server, then for each number of concurrent clients (1, 8, 32) each client sends
`requests_per_client` streaming chat requests one after the other. Per run it prints requests/s,
completion tokens/s, time to first token (request sent -> first content chunk) and latency
(request sent -> data: [DONE]) at p50/p95, the failures (which must be 0: exit code 1 otherwise)
and the server's RSS: idle after loading and a warm-up request, and its peak during the run.

    python -m scripts.bench_web                                            # newest chat checkpoint
    python -m scripts.bench_web --checkpoint=chatsft_checkpoints/d4 --max_tokens=64
    python -m scripts.bench_web --batch_sizes=32 --clients=32              # one setting, one load
    python -m scripts.bench_web --url=http://127.0.0.1:8000 --clients=32   # against a running server

The servers started here get `queue_timeout` (default 600 s): the point is to measure latency under
load, not to shed it; a server you run yourself keeps its own setting (503s then count as failures)
and its RSS is not measured.
"""
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import asyncio
import json
import socket
import subprocess
import threading
import time

import httpx

from nanochat.configurator import configure

# ----------------------------------------------------------------------------- defaults
url = ""                       # a running server; empty: start `scripts.chat_web` here, once per batch size
checkpoint = ""                # the servers started here: their --checkpoint (empty: newest chat checkpoint)
batch_sizes = "1,32"           # the servers started here: their --max_batch_size, one server each
queue_timeout = 600.0          # the servers started here: their --queue_timeout
clients = "1,8,32"             # concurrent clients, one run each
requests_per_client = 2        # requests each client sends, one after the other
max_tokens = 64                # per reply
temperature = 0.8
top_k = 50
seed = 0                       # request i uses seed + i: the same replies run to run
request_timeout = 600.0        # seconds before a client gives up on a request
user_config = configure(globals())
# -----------------------------------------------------------------------------

PROMPTS = ["What is 12 plus 30?", "Who are you?", "你好，你是谁？", "Tell me something about the sea.",
           "How many r are in the word strawberry?", "What is 7 times 8?", "Say hello in French.",
           "Write a short poem about cats."]


def start_server(max_batch_size):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "scripts.chat_web", "--", f"--port={port}", f"--max_batch_size={max_batch_size}",
            f"--queue_timeout={queue_timeout}"] + ([f"--checkpoint={checkpoint}"] if checkpoint else [])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(args, cwd=repo, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench_web: the server exited with code {proc.returncode}:\n{proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(proc)
    sys.exit("bench_web: the server did not answer /health within 300 s")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def rss_mb(pid):
    """Resident memory of a process (Linux /proc), MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    """Samples a process's RSS every 20 ms in a thread while the with-block runs: .peak in MB."""

    def __init__(self, pid):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))


async def one_request(client, base, i):
    """One streaming request -> dict(ok, latency, ttft, tokens, error)."""
    body = {"model": "bench", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": max_tokens, "temperature": temperature,
            "top_k": top_k, "seed": seed + i}
    t0 = time.perf_counter()
    ttft, tokens, done, text = None, 0, False, ""
    try:
        async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    text += chunk["choices"][0]["delta"]["content"]
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if not done or ttft is None or tokens == 0:
        return {"ok": False, "error": f"incomplete stream (done={done}, text={text[:40]!r}, tokens={tokens})"}
    return {"ok": True, "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens}


async def load(base, n_clients):
    """n_clients concurrent clients, requests_per_client each -> (results, wall seconds)."""
    limits = httpx.Limits(max_connections=n_clients + 1, max_keepalive_connections=n_clients + 1)
    async with httpx.AsyncClient(timeout=request_timeout, limits=limits) as client:

        async def client_loop(c):
            return [await one_request(client, base, c * requests_per_client + k) for k in range(requests_per_client)]

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(c) for c in range(n_clients)))
        wall = time.perf_counter() - t0
    return [r for rs in per_client for r in rs], wall


def percentile(values, q):
    """Nearest-rank percentile of a non-empty list."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def summarize(results, wall):
    ok = [r for r in results if r["ok"]]
    row = {"requests": len(results), "failed": len(results) - len(ok), "wall": wall}
    if ok:
        lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok]
        row.update(rps=len(ok) / wall, tps=sum(r["tokens"] for r in ok) / wall,
                   ttft50=percentile(ttft, 50), ttft95=percentile(ttft, 95),
                   lat50=percentile(lat, 50), lat95=percentile(lat, 95))
    for r in [r for r in results if not r["ok"]][:5]:
        print(f"  failure: {r['error']}")
    return row


def bench_server(label, base, pid):
    """Every client count against one server -> table rows."""
    asyncio.run(load(base, 1))  # warm-up, not counted: the first forwards, the allocator
    idle = rss_mb(pid) if pid else None
    health = httpx.get(base + "/health", timeout=10).json()
    print(f"\n{label}: {health['model']} on {health['device']}, max_batch_size {health.get('max_batch_size')}"
          + (f", idle RSS {idle:.0f} MB" if idle else ""))
    rows = []
    for n in (int(c) for c in str(clients).split(",")):
        if pid:
            with PeakRSS(pid) as rss:
                results, wall = asyncio.run(load(base, n))
        else:
            results, wall = asyncio.run(load(base, n))
        row = {"server": label, "clients": n, **summarize(results, wall),
               "idle": idle, "peak": rss.peak if pid else None}
        after = httpx.get(base + "/health", timeout=10).json()
        row["lost"] = after.get("active", 0) + after.get("queue_depth", 0)  # sequences left behind
        print(format_row(row))
        rows.append(row)
    return rows


HEADER = (f"{'server':<18} {'clients':>7} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'lat p50':>8} {'lat p95':>8} {'failed':>6} {'lost':>4} {'RSS idle->peak':>16}")


def format_row(r):
    rss = f"{r['idle']:.0f}->{r['peak']:.0f} MB" if r["idle"] else "n/a"
    if "rps" not in r:
        return f"{r['server']:<18} {r['clients']:>7} {'(all failed)':>34} {r['failed']:>31} {r['lost']:>4} {rss:>16}"
    return (f"{r['server']:<18} {r['clients']:>7} {r['rps']:>7.2f} {r['tps']:>7.0f} {r['ttft50']:>8.2f}s "
            f"{r['ttft95']:>8.2f}s {r['lat50']:>7.2f}s {r['lat95']:>7.2f}s {r['failed']:>6} {r['lost']:>4} {rss:>16}")


print(f"bench_web: clients {clients} x {requests_per_client} streaming requests each, max_tokens={max_tokens}, "
      f"temperature={temperature}, top_k={top_k}")
rows = []
if url:
    rows += bench_server(url, url, None)
else:
    for b in (int(b) for b in str(batch_sizes).split(",")):
        proc, base = start_server(b)
        try:
            rows += bench_server(f"max_batch_size={b}", base, proc.pid)
        finally:
            stop_server(proc)
print("\n" + HEADER)
for r in rows:
    print(format_row(r))
for n in sorted({r["clients"] for r in rows}):
    one, batched = [next((r for r in rows if r["clients"] == n and r["server"] == f"max_batch_size={b}"), None)
                    for b in ("1", str(batch_sizes).split(",")[-1])]
    if not url and one and batched and one is not batched and "rps" in one and "rps" in batched:
        print(f"{n} clients: batched/one-at-a-time throughput {batched['rps'] / one['rps']:.2f}x, "
              f"p95 TTFT {batched['ttft95']:.2f} s vs {one['ttft95']:.2f} s, "
              f"peak/idle RSS {batched['peak'] / batched['idle']:.2f}x")
sys.exit(1 if any(r["failed"] or r["lost"] or "rps" not in r for r in rows) else 0)
