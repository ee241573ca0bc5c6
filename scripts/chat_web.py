"""
Talk to a chat model in the browser, or over an OpenAI-compatible API.

    python -m scripts.chat_web                                   # newest chat checkpoint on http://127.0.0.1:8000
    python -m scripts.chat_web --checkpoint=chatsft_checkpoints/d4 --host=0.0.0.0 --api_key=SECRET
    python -m scripts.chat_web --checkpoint=base_checkpoints/d4  # a base model: use /v1/completions

Endpoints
    GET  /                      the chat page (nanochat/ui.html: one self-contained file, works offline)
    POST /v1/chat/completions   messages, temperature, top_p, top_k (extension), max_tokens / max_completion_tokens,
                                n, stop, seed, logprobs + top_logprobs, stream, stream_options.include_usage
    POST /v1/completions        prompt (plain text, no chat template: the way to a base model), the same settings
                                and logprobs (an int: how many alternatives per token)
    GET  /v1/models             the one model served
    GET  /health                model, device, uptime, active sequences, queue depth

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "Hi"}])

Serving: one model per device and one engine (nanochat.engine: continuous batching) stepped by its
own thread. A request's sequences (n of them) join the running batch after their prompt is
prefilled and leave when done; every active sequence shares each forward. --max_batch_size=1
decodes one request at a time (the old behaviour, for comparison). A request that is not admitted
within queue_timeout seconds gets 503 with Retry-After; a client that disconnects cancels its
sequences at the next step. With --api_key every /v1 request needs "Authorization: Bearer KEY";
serving on a non-loopback host needs a key (or --allow_no_key).

Tool calls show in the reply as [calc: 12+30 = 42] (the calculator) or a [python] ... [output] ...
[/python] block (code run in the sandbox, --tools=python, the default; --tools=calc: the calculator
only); when a client sends the conversation back, they are turned into tool-call parts again, so the
model sees what it was trained on.
"""
import os
import sys

if __package__ in (None, ""):  # also runnable as `python scripts/chat_web.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ----------------------------------------------------------------------------- defaults
checkpoint = ""                # empty: the newest checkpoint of chatrl, else chatdpo, chatsft, mid
host = "127.0.0.1"
port = 8000
device_type = ""               # cuda | mps | cpu; empty: autodetect (one engine per GPU)
max_batch_size = 32            # sequences decoded together; 1: one at a time
max_step_tokens = 512          # tokens per forward: prompt chunks + one per decoding sequence
tools = "python"               # what runs the model's tool calls: python (the calculator, else the sandbox) | calc | none
python_timeout = 5.0           # seconds per python call (then the call's output says it timed out)
max_output_tokens = 256        # a tool's output fed back to the model is cut to this many tokens
api_key = ""                   # required as "Authorization: Bearer KEY" on /v1/*; default $NANOCHAT_API_KEY
allow_no_key = False           # serve on a non-loopback host without an API key
# what a request gets when it does not say
default_temperature = 0.8
default_top_k = 50             # 0: off
default_max_tokens = 256       # less when the context has less room left
# abuse limits (a request beyond them gets a 4xx naming the limit)
max_messages = 64              # messages per request
max_message_chars = 8000       # characters per message (and per completions prompt)
max_max_tokens = 1024          # largest max_tokens a client may ask for
max_context = 0                # prompt + reply tokens; 0: the model's sequence_len
max_n = 8                      # choices per request
max_top_logprobs = 20          # alternatives per token
max_stop = 4                   # stop sequences per request
max_stop_chars = 64            # characters per stop sequence
max_body_bytes = 1_000_000     # request body
# queueing
queue_timeout = 10.0           # seconds a request may wait to be admitted before 503
max_queue = 256                # sequences waiting to be admitted; more get 503 at once
retry_after = 5                # seconds, the 503's Retry-After header
max_connections = 1024         # open connections (uvicorn's limit_concurrency; more get 503)
slow_down = 0.0                # seconds of sleep per engine step: for tests and queue demos only

from nanochat.configurator import configure
configure(globals())
# -----------------------------------------------------------------------------

import asyncio
import functools
import json
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat import openai_api as api
from nanochat.checkpoint_manager import CheckpointError, load_model
from nanochat.common import autocast_for, autodetect_device_type, get_base_dir
from nanochat.engine import Engine, Sequence
from nanochat.openai_api import ApiError
from nanochat.tokenizer import get_tokenizer

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")
api_key = api_key or os.environ.get("NANOCHAT_API_KEY", "")
if host not in ("127.0.0.1", "localhost", "::1") and not api_key and not allow_no_key:
    sys.exit(f"chat_web: --host={host} is reachable from other machines: give --api_key=KEY (or $NANOCHAT_API_KEY), "
             "or --allow_no_key to serve without one")


# ----------------------------------------------------------------------------- model, tokenizer, engines
class EngineThread:
    """One engine (one model on one device) and the thread that steps it while it has work."""

    def __init__(self, model, device):
        self.device, self.autocast = device, autocast_for(device)
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_step_tokens=max_step_tokens,
                             tools=tools, python_timeout=python_timeout, max_output_tokens=max_output_tokens)
        self.wake = threading.Event()
        threading.Thread(target=self.run, daemon=True).start()

    def submit(self, seqs):
        self.engine.submit(seqs)
        self.wake.set()

    def load(self):
        return len(self.engine.rows) + len(self.engine.parked) + self.queued()

    def queued(self):
        return sum(len(job.seqs) for job in list(self.engine.waiting))

    def run(self):
        while True:
            if not self.engine.has_work():
                self.wake.wait()
                self.wake.clear()
                continue
            try:
                with self.autocast:
                    self.engine.step()
            except Exception as e:  # every request in flight gets a 500; the server keeps serving
                stuck = list(self.engine.rows) + list(self.engine.parked) + \
                    [s for job in list(self.engine.waiting) for s in job.seqs]
                for s in stuck:
                    s._emit("error", f"generation failed: {type(e).__name__}: {e}")
                self.engine.discard(stuck)
            if slow_down:
                time.sleep(slow_down)


device_type = device_type or autodetect_device_type()
devices = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())] if device_type == "cuda" \
    else [torch.device(device_type)]
tokenizer = get_tokenizer()
try:
    engines = []
    for d in devices:
        model, meta, checkpoint_dir, step = load_model(checkpoint, d, tokenizer, default_stage="chat")
        engines.append(EngineThread(model, d))
except CheckpointError as e:
    sys.exit(f"chat_web: {e}")
context_len = max_context or model.config.sequence_len
rel = os.path.relpath(checkpoint_dir, get_base_dir())
model_name = f"nanochat-{rel.replace(os.sep, '-').replace('_checkpoints', '')}-step{step}"
started = time.time()
parse_settings = functools.partial(
    api.parse_settings, vocab_size=tokenizer.get_vocab_size(), max_max_tokens=max_max_tokens, max_n=max_n,
    max_top_logprobs=max_top_logprobs, max_stop=max_stop, max_stop_chars=max_stop_chars,
    default_temperature=default_temperature, default_top_k=default_top_k)
loop = None  # the server's event loop (set at startup)


# ----------------------------------------------------------------------------- the app
@asynccontextmanager
async def lifespan(app):
    global loop
    loop = asyncio.get_running_loop()
    yield


app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)


@app.exception_handler(ApiError)
async def api_error(request, e):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@app.exception_handler(StarletteHTTPException)
async def http_error(request, e):
    return await api_error(request, ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                             code="not_found" if e.status_code == 404 else None,
                                             headers=getattr(e, "headers", None)))


@app.exception_handler(Exception)
async def unexpected_error(request, e):
    return await api_error(request, ApiError(500, f"internal error: {type(e).__name__}"))


@app.middleware("http")
async def require_api_key(request, call_next):
    if api_key and request.url.path.startswith("/v1/"):
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer "):
            return await api_error(request, ApiError(401, "You didn't provide an API key: send it as "
                                                          "'Authorization: Bearer KEY'", code="invalid_api_key"))
        if not secrets.compare_digest(given[len("Bearer "):].encode(), api_key.encode()):
            return await api_error(request, ApiError(401, "Incorrect API key provided", code="invalid_api_key"))
    return await call_next(request)


@app.get("/")
async def index():
    with open(UI_PATH, encoding="utf-8") as f:
        return HTMLResponse(f.read(), headers={"Cache-Control": "no-cache"})


@app.get("/health")
async def health():
    return {"status": "ok", "model": model_name, "checkpoint": checkpoint_dir, "step": step,
            "device": ", ".join(str(e.device) for e in engines), "context": context_len,
            "uptime_s": round(time.time() - started, 1), "max_batch_size": max_batch_size,
            "active": sum(len(e.engine.rows) + len(e.engine.parked) for e in engines),
            "queue_depth": sum(e.queued() for e in engines), "tools": tools}


@app.get("/v1/models")
async def models_list():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                        "owned_by": "nanochat"}]}


async def read_body(request):
    """The body, refusing more than max_body_bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body_bytes:
        raise ApiError(413, f"the request body is {declared} bytes; the limit is {max_body_bytes}", code="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise ApiError(413, f"the request body is over the limit of {max_body_bytes} bytes", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def generate(request, prompt, settings):
    """Queue the request's n sequences on the least busy engine and wait until they are admitted
    (503 after queue_timeout). Returns (sequences, event queue of (choice, kind, payload))."""
    events = asyncio.Queue()
    busy = {"Retry-After": str(retry_after)}
    if sum(e.queued() for e in engines) + settings["n"] > max_queue:
        raise ApiError(503, f"the server is busy (over {max_queue} sequences waiting); retry later", code="overloaded",
                       headers=busy)
    seed = settings["seed"] if settings["seed"] is not None else secrets.randbits(62)
    seqs = [Sequence(prompt, settings["max_tokens"], settings["temperature"], settings["top_k"] or None,
                     settings["top_p"], seed=seed + i, stop=settings["stop"], logprobs=settings["logprobs"],
                     on_event=functools.partial(lambda i, *e: loop.call_soon_threadsafe(events.put_nowait, (i, *e)), i))
            for i in range(settings["n"])]
    target = min(engines, key=lambda e: e.load())
    target.submit(seqs)
    try:  # the first token of the first sequence says the request is in the batch
        first = await asyncio.wait_for(events.get(), timeout=queue_timeout)
    except asyncio.TimeoutError:
        cancel(target, seqs)
        raise ApiError(503, f"the server stayed busy for {queue_timeout:g} s; retry later", code="overloaded",
                       headers=busy) from None
    events.put_nowait(first)
    if await request.is_disconnected():
        cancel(target, seqs)
        return None, None
    return seqs, events


def cancel(target, seqs):
    """Cancel sequences from the event loop: the engine's thread takes them out at its next step."""
    for s in seqs:
        s.cancel()
    target.wake.set()


async def collect(request, seqs, events):
    """Wait for every sequence to finish; a client that hangs up cancels them (False)."""
    async def hang_up():  # the body is read: the next message is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass
    watcher = asyncio.ensure_future(hang_up())
    try:
        while not all(s.done for s in seqs):
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                getter.cancel()
                return False
            _, kind, *payload = getter.result()
            if kind == "error":
                raise ApiError(500, payload[0])
        return True
    finally:
        watcher.cancel()
        for s in seqs:
            s.cancel()  # a no-op once done


def usage(prompt, seqs):
    completion = sum(len(s.tokens) for s in seqs)
    return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}


def finish_reason(seq):
    return "stop" if seq.finish_reason == "stop" else "length"


def stream(seqs, events, make_chunk, final_chunk):
    """Server-sent events: a chunk per text piece of any choice, a final one per choice, usage, [DONE]."""
    async def sse():
        try:
            for i in range(len(seqs)):
                opening = make_chunk(i, None, None, first=True)
                if opening:
                    yield opening
            done = 0
            while done < len(seqs):
                i, kind, *payload = await events.get()
                if kind == "text":
                    yield make_chunk(i, payload[0], None)
                elif kind == "done":
                    done += 1
                    yield make_chunk(i, None, finish_reason(seqs[i]))
                elif kind == "error":
                    yield "data: " + json.dumps(ApiError(500, payload[0]).body()) + "\n\n"
                    return
            if final_chunk:
                yield final_chunk()
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away and this generator was cancelled
            for s in seqs:
                s.cancel()
    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body = api.parse_body(await read_body(request))
    conversation = api.parse_messages(body, max_messages, max_message_chars)
    settings = parse_settings(body, chat=True)
    try:  # long prompts: off the event loop
        prompt = await asyncio.to_thread(tokenizer.render_for_completion, {"conversations": conversation})
    except ValueError as e:  # order of roles, a system message not first, ...
        raise ApiError(400, f"messages: {e}", param="messages", code="invalid_messages") from None
    api.fit_context(len(prompt), settings, context_len, default_max_tokens, "messages")
    seqs, events = await generate(request, prompt, settings)
    if seqs is None:
        return Response(status_code=499)
    reply_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_name}
    if settings["stream"]:
        def chunk(i, text, finish, first=False):
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return "data: " + json.dumps({**head, "choices": [{"index": i, "delta": delta, "finish_reason": finish}]},
                                          ensure_ascii=False) + "\n\n"
        final = (lambda: "data: " + json.dumps({**head, "choices": [], "usage": usage(prompt, seqs)}) + "\n\n") \
            if settings["include_usage"] else None
        return stream(seqs, events, chunk, final)
    if not await collect(request, seqs, events):
        return Response(status_code=499)
    choices = [{"index": i, "message": {"role": "assistant", "content": s.text}, "finish_reason": finish_reason(s),
                "logprobs": api.chat_logprobs(tokenizer, s.token_logprobs) if s.logprobs is not None else None}
               for i, s in enumerate(seqs)]
    return {"id": reply_id, "object": "chat.completion", "created": created, "model": model_name, "choices": choices,
            "usage": usage(prompt, seqs)}


@app.post("/v1/completions")
async def completions(request: Request):
    body = api.parse_body(await read_body(request))
    text = api.parse_prompt(body, max_message_chars)
    settings = parse_settings(body, chat=False)
    prompt = [tokenizer.get_bos_token_id(), *await asyncio.to_thread(tokenizer.encode, text)]
    api.fit_context(len(prompt), settings, context_len, default_max_tokens, "prompt")
    seqs, events = await generate(request, prompt, settings)
    if seqs is None:
        return Response(status_code=499)
    reply_id, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": reply_id, "object": "text_completion", "created": created, "model": model_name}
    if settings["stream"]:
        def chunk(i, piece, finish, first=False):
            if first:
                return ""
            return "data: " + json.dumps({**head, "choices": [{"index": i, "text": piece or "", "logprobs": None,
                                                               "finish_reason": finish}]}, ensure_ascii=False) + "\n\n"
        final = (lambda: "data: " + json.dumps({**head, "choices": [], "usage": usage(prompt, seqs)}) + "\n\n") \
            if settings["include_usage"] else None
        return stream(seqs, events, chunk, final)
    if not await collect(request, seqs, events):
        return Response(status_code=499)
    choices = [{"index": i, "text": s.text, "finish_reason": finish_reason(s),
                "logprobs": api.completion_logprobs(tokenizer, s.token_logprobs) if s.logprobs is not None else None}
               for i, s in enumerate(seqs)]
    return {"id": reply_id, "object": "text_completion", "created": created, "model": model_name, "choices": choices,
            "usage": usage(prompt, seqs)}


if __name__ == "__main__":
    print(f"chat_web: {model_name} ({checkpoint_dir} step {step}) on {', '.join(str(d) for d in devices)}, "
          f"batches of up to {max_batch_size}, context {context_len} tokens; http://{host}:{port}/"
          + (" (API key required)" if api_key else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", limit_concurrency=max_connections,
                timeout_keep_alive=30)
