"""
Load test for scripts/chat_web.py (not a test: it measures). `clients` concurrent clients each
send `requests_per_client` streaming chat requests, one after the other; prints requests/s,
completion tokens/s, p50/p95 latency (request sent -> data: [DONE]), p50/p95 time to first token
(request sent -> first content chunk) and the failures, which must be 0 (exit code 1 otherwise).

    python -m scripts.bench_web                                            # starts a server: newest chat checkpoint
    python -m scripts.bench_web --checkpoint=chatsft_checkpoints/d4 --num_workers=2 --max_tokens=64
    python -m scripts.bench_web --url=http://127.0.0.1:8000 --clients=32   # against a running server

A server started here gets `queue_timeout` (default 120 s): the point is to measure latency under
load, not to shed it; a server you run yourself keeps its own setting (503s then count as failures).
"""
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import asyncio
import json
import socket
import subprocess
import time

import httpx

from nanochat.configurator import configure

# ----------------------------------------------------------------------------- defaults
url = ""                       # a running server; empty: start `scripts.chat_web` here
checkpoint = ""                # the server started here: its --checkpoint (empty: newest chat checkpoint)
num_workers = 2                # the server started here: its --num_workers
queue_timeout = 120.0          # the server started here: its --queue_timeout
clients = 32                   # concurrent clients
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


def start_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "scripts.chat_web", f"--port={port}", f"--num_workers={num_workers}",
            f"--queue_timeout={queue_timeout}"] + ([f"--checkpoint={checkpoint}"] if checkpoint else [])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(args, cwd=repo, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench_web: the server exited with code {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    sys.exit("bench_web: the server did not answer /health within 300 s")


async def one_request(client, base, i):
    """One streaming request -> dict(ok, latency, ttft, tokens, error)."""
    body = {"model": "bench", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "stream": True,
            "max_tokens": max_tokens, "temperature": temperature, "top_k": top_k, "seed": seed + i}
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


async def run(base):
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(timeout=request_timeout, limits=limits) as client:
        await one_request(client, base, -1)  # warm-up, not counted

        async def client_loop(c):
            return [await one_request(client, base, c * requests_per_client + k) for k in range(requests_per_client)]

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return [r for rs in per_client for r in rs], wall


def percentile(values, q):
    """Nearest-rank percentile of a non-empty list."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


proc = None
if not url:
    proc, url = start_server()
try:
    health = httpx.get(url + "/health", timeout=10).json()
    print(f"bench_web: {health['model']} on {health['device']}, {health['workers']} worker(s); {clients} clients x "
          f"{requests_per_client} streaming requests, max_tokens={max_tokens}, temperature={temperature}")
    results, wall = asyncio.run(run(url))
    ok = [r for r in results if r["ok"]]
    failed = [r for r in results if not r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    print(f"requests: {len(results)} in {wall:.1f} s, {len(failed)} failed")
    if ok:
        lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok]
        print(f"throughput: {len(ok) / wall:.2f} requests/s, {tokens / wall:.0f} completion tokens/s "
              f"({tokens / len(ok):.1f} tokens per reply)")
        print(f"latency: p50 {percentile(lat, 50):.2f} s, p95 {percentile(lat, 95):.2f} s, max {max(lat):.2f} s")
        print(f"time to first token: p50 {percentile(ttft, 50):.2f} s, p95 {percentile(ttft, 95):.2f} s, "
              f"max {max(ttft):.2f} s")
    for r in failed[:5]:
        print(f"  failure: {r['error']}")
    after = httpx.get(url + "/health", timeout=10).json()
    print(f"after: busy_workers {after['busy_workers']}, queue_depth {after['queue_depth']}")
finally:
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
sys.exit(1 if failed or not ok else 0)
