"""
Talk to a chat model in the browser, or over an OpenAI-compatible API.

    python -m scripts.chat_web                                   # newest chat checkpoint on http://127.0.0.1:8000
    python -m scripts.chat_web --checkpoint=chatsft_checkpoints/d4 --host=0.0.0.0 --port=8000 --num_workers=2

Endpoints
    GET  /                      the chat page (nanochat/ui.html: one self-contained file, works offline)
    POST /v1/chat/completions   OpenAI Chat Completions: model, messages, temperature, top_p, max_tokens
                                (or max_completion_tokens), stream, stop, seed, n=1; top_k as an extension.
                                Streaming sends chat.completion.chunk events, a last chunk with usage, then
                                `data: [DONE]`.
    GET  /v1/models             the one model served
    GET  /health                model, device, uptime, workers, busy workers, queue depth

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "Hi"}])

Concurrency: `num_workers` engine workers, each with its own copy of the model (one per GPU on
CUDA), wait in an asyncio queue. A request takes a free worker, or waits up to `queue_timeout`
seconds and then gets 503 with Retry-After. Generation runs in a thread, so the event loop keeps
serving; a client that disconnects stops its generation at the next token, and the worker goes
back to the queue only when its thread has really stopped. Requests share no state: each one
gets a fresh KV cache, its own sampling generator and its own conversation.

Calculator calls show in the reply as [calc: 12+30 = 42]; when a client sends the conversation
back, they are turned into tool-call parts again, so the model sees what it was trained on.
"""
import os
import sys

if __package__ in (None, ""):  # also runnable as `python scripts/chat_web.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import asyncio
import copy
import json
import re
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager, nullcontext

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.checkpoint_manager import CheckpointError, load_model
from nanochat.common import autodetect_device_type, compute_dtype, get_base_dir
from nanochat.configurator import configure
from nanochat.engine import Engine
from nanochat.tokenizer import get_tokenizer

# ----------------------------------------------------------------------------- defaults
checkpoint = ""                # empty: the newest checkpoint of chatrl, else chatdpo, chatsft, mid
host = "127.0.0.1"
port = 8000
num_workers = 0                # engine workers; 0: one per GPU on CUDA, else 1
device_type = ""               # cuda | mps | cpu; empty: autodetect
# what a request gets when it does not say
default_temperature = 0.8
default_top_k = 50             # 0: off
default_max_tokens = 256       # less when the context has less room left
# abuse limits (a request beyond them gets a 4xx naming the limit)
max_messages = 64              # messages per request
max_message_chars = 8000       # characters per message
max_max_tokens = 1024          # largest max_tokens a client may ask for
max_context = 0                # prompt + reply tokens; 0: the model's sequence_len
max_stop = 4                   # stop sequences per request
max_stop_chars = 64            # characters per stop sequence
max_body_bytes = 1_000_000     # request body
# queueing
queue_timeout = 10.0           # seconds a request may wait for a free worker before 503
max_queue = 256                # requests waiting for a worker; more get 503 at once
retry_after = 5                # seconds, the 503's Retry-After header
max_connections = 1024         # open connections (uvicorn's limit_concurrency; more get 503)
slow_down = 0.0                # seconds of sleep per generated token: for tests and queue demos only
configure(globals())
# -----------------------------------------------------------------------------

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")
CALC_RE = re.compile(r"\[calc: (.*?) = (.*?)\]")
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self):
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------- request validation
def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body, name, default, low, high, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise ApiError(400, f"'{name}' must be a number, got {type(value).__name__}", param=name, code="invalid_type")
    if not (low < value <= high if low_open else low <= value <= high) or value != value:
        raise ApiError(400, f"'{name}' must be in {'(' if low_open else '['}{low}, {high}], got {value}",
                       param=name, code="invalid_value")
    return float(value)


def _int(body, name, default, low, high):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise ApiError(400, f"'{name}' must be an integer, got {type(value).__name__}", param=name, code="invalid_type")
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be in [{low}, {high}], got {value}", param=name, code="invalid_value")
    return value


def message_text(i, msg):
    """A message's content as text: a string, or OpenAI content parts of type "text"."""
    content = msg.get("content")
    if isinstance(content, list):
        pieces = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content[{j}]: only parts of type 'text' with a string 'text' "
                                    "are supported", param=f"messages[{i}].content", code="invalid_type")
            pieces.append(part["text"])
        content = "".join(pieces)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts, "
                            f"got {type(content).__name__}", param=f"messages[{i}].content", code="invalid_type")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") decodes from JSON but is no text
        raise ApiError(400, f"messages[{i}].content is not valid Unicode text (a lone surrogate)",
                       param=f"messages[{i}].content", code="invalid_value") from None
    if not content.strip():
        raise ApiError(400, f"messages[{i}].content is empty", param=f"messages[{i}].content", code="empty_message")
    if len(content) > max_message_chars:
        raise ApiError(400, f"messages[{i}].content has {len(content)} characters; the limit is {max_message_chars}",
                       param=f"messages[{i}].content", code="message_too_long")
    return content


def assistant_parts(text):
    """An assistant reply as sent back by a client -> the tokenizer's parts: each
    [calc: expr = result] becomes a python call and its output, as the model wrote them."""
    parts, pos = [], 0
    for m in CALC_RE.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos:m.start()]})
        parts.append({"type": "python", "text": m.group(1)})
        if m.group(2) != "?":  # "?": the calculator refused, no output was forced
            parts.append({"type": "python_output", "text": m.group(2)})
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts if len(parts) != 1 or parts[0]["type"] != "text" else text


def parse_request(raw: bytes):
    """Body bytes -> (conversation, sampling settings); ApiError for anything out of bounds."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_type")
    if "model" in body and not isinstance(body["model"], str):
        raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ApiError(400, "'messages' is required and must be a list of {role, content} objects",
                       param="messages", code="invalid_type")
    if not messages:
        raise ApiError(400, "'messages' is empty", param="messages", code="empty_messages")
    if len(messages) > max_messages:
        raise ApiError(400, f"{len(messages)} messages; the limit is {max_messages}", param="messages",
                       code="too_many_messages")
    conversation = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ApiError(400, f"messages[{i}] must be an object, got {type(msg).__name__}",
                           param=f"messages[{i}]", code="invalid_type")
        role = msg.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role {role!r} is not supported (use 'system', 'user' or 'assistant')",
                           param=f"messages[{i}].role", code="invalid_role")
        text = message_text(i, msg)
        conversation.append({"role": role, "content": assistant_parts(text) if role == "assistant" else text})
    if conversation[-1]["role"] != "user":
        raise ApiError(400, "the last message must come from the user", param="messages", code="invalid_order")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > max_stop or \
            not all(isinstance(s, str) and 0 < len(s) <= max_stop_chars for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of up to {max_stop} non-empty strings of at most "
                            f"{max_stop_chars} characters", param="stop", code="invalid_value")
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    settings = {
        "stream": stream,
        "stop": stop,
        "temperature": _number(body, "temperature", default_temperature, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        "top_k": _int(body, "top_k", default_top_k, 0, vocab_size),
        "max_tokens": _int(body, limit_name, None, 1, max_max_tokens),
        "max_tokens_name": limit_name,
        "seed": _int(body, "seed", None, 0, 2 ** 63 - 1),
    }
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    return conversation, settings


def render_prompt(conversation, settings):
    """Tokens of the conversation up to <|assistant_start|>; checks them against the context and
    fills in max_tokens (the room left, up to default_max_tokens) when the client did not."""
    try:
        prompt = tokenizer.render_for_completion({"conversations": conversation})
    except ValueError as e:  # order of roles, a system message not first, ...
        raise ApiError(400, f"messages: {e}", param="messages", code="invalid_messages") from None
    room = context_len - len(prompt)
    if room < 1:
        raise ApiError(400, f"the conversation is {len(prompt)} tokens; this model's context is {context_len} "
                            "tokens (prompt + reply): shorten it or start a new chat",
                       param="messages", code="context_length_exceeded")
    if settings["max_tokens"] is None:
        settings["max_tokens"] = min(default_max_tokens, room)
    elif settings["max_tokens"] > room:
        raise ApiError(400, f"the conversation is {len(prompt)} tokens and {settings['max_tokens_name']} is "
                            f"{settings['max_tokens']}: together more than this model's context of {context_len} "
                            "tokens", param=settings["max_tokens_name"], code="context_length_exceeded")
    return prompt


# ----------------------------------------------------------------------------- generation (worker threads)
class Worker:
    """One engine (its own model copy) and the settings its thread generates with."""

    def __init__(self, model, device):
        self.device = device
        self.engine = Engine(model, tokenizer)
        dtype = compute_dtype(device.type)
        self.autocast = (lambda: torch.amp.autocast(device_type=device.type, dtype=dtype)) \
            if dtype != torch.float32 else nullcontext


class ReplyText:
    """Turns a reply's tokens into text as they come: text runs are decoded whole each time so a
    character split across tokens comes out only once complete; a calculator call becomes
    [calc: expr = result] once its output (or the absence of one) is known."""

    def __init__(self):
        self.run, self.shown = [], ""  # current text run, and what of it was returned
        self.expr, self.output, self.mode = [], [], "text"

    def _text(self, final=False):
        decoded = tokenizer.decode(self.run)
        if not final:
            decoded = decoded.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its next byte
        if not decoded.startswith(self.shown):
            return ""  # a later byte changed how earlier ones decode: what was sent stays sent
        new, self.shown = decoded[len(self.shown):], decoded
        return new

    def _call(self):
        expr = tokenizer.decode(self.expr).strip()
        result = tokenizer.decode(self.output).strip() if self.output else "?"
        self.expr, self.output, self.mode = [], [], "text"
        return f"[calc: {expr} = {result}]"

    def add(self, token):
        out = ""
        if self.mode == "called" and token != special["<|output_start|>"]:
            out += self._call()  # refused expression: no output follows
        if token == special["<|python_start|>"]:
            out += self._text(final=True)
            self.run, self.shown, self.mode = [], "", "expr"
        elif token == special["<|python_end|>"] and self.mode == "expr":
            self.mode = "called"
        elif token == special["<|output_start|>"] and self.mode == "called":
            self.mode = "output"
        elif token == special["<|output_end|>"] and self.mode == "output":
            out += self._call()
        elif self.mode == "expr":
            self.expr.append(token)
        elif self.mode == "output":
            self.output.append(token)
        elif token not in special_ids:
            self.run.append(token)
            out += self._text()
        return out

    def finish(self):
        out = self._call() if self.mode != "text" else ""
        return out + self._text(final=True)


def held_back(text, stops):
    """How many trailing characters of text could be the start of a stop sequence (not sent yet)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def first_stop(text, stops, start):
    """Index of the earliest stop sequence in text[start:] (as an index into text), or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def generate(worker, prompt, settings, emit, cancelled):
    """Runs in a thread: stream the reply through emit("text", piece), then emit("done",
    finish_reason, completion_tokens) (or emit("error", message)). Stops at the next token once
    `cancelled` is set. Always gives the worker back when done."""
    stops = settings["stop"]
    reply, text, sent, n_tokens, finish, cut = ReplyText(), "", 0, 0, "length", None
    tokens = None
    try:
        with worker.autocast():
            tokens = worker.engine.stream(prompt, max_tokens=settings["max_tokens"],
                                          temperature=settings["temperature"], top_k=settings["top_k"] or None,
                                          top_p=settings["top_p"] if settings["top_p"] < 1.0 else None,
                                          seed=settings["seed"])
            for token, _ in tokens:
                if cancelled.is_set():
                    return
                n_tokens += 1
                if token in worker.engine.stop_ids:
                    finish = "stop"
                    break
                text += reply.add(token)
                cut = first_stop(text, stops, max(0, sent - max_stop_chars))
                if cut is not None:
                    break
                safe = len(text) - held_back(text, stops)  # a possible stop sequence's start waits
                if safe > sent:
                    emit("text", text[sent:safe])
                    sent = safe
                if slow_down:
                    time.sleep(slow_down)
        if cut is None:
            text += reply.finish()  # held-back bytes, an unfinished calculator call
            cut = first_stop(text, stops, max(0, sent - max_stop_chars))
        if cut is not None:
            text, finish = text[:cut], "stop"
        if len(text) > sent:
            emit("text", text[sent:])
        emit("done", finish, n_tokens)
    except Exception as e:  # reported to the client as a 500; the server keeps serving
        emit("error", f"generation failed: {type(e).__name__}: {e}")
    finally:
        if tokens is not None:
            tokens.close()
        loop.call_soon_threadsafe(free_workers.put_nowait, worker)


# ----------------------------------------------------------------------------- model and workers
device_type = device_type or autodetect_device_type()
if device_type == "cuda":
    devices = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    num_workers = num_workers or len(devices)
    devices = [devices[i % len(devices)] for i in range(num_workers)]
else:
    num_workers = num_workers or 1
    devices = [torch.device(device_type)] * num_workers
    if device_type == "cpu":  # share the cores between the workers instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_workers))
tokenizer = get_tokenizer()
try:
    models = {}
    for d in dict.fromkeys(devices):
        models[d], meta, checkpoint_dir, step = load_model(checkpoint, d, tokenizer, default_stage="chat")
except CheckpointError as e:
    sys.exit(f"chat_web: {e}")
vocab_size = tokenizer.get_vocab_size()
special = {name: tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
special_ids = set(special.values())
first_model = next(iter(models.values()))
context_len = max_context or first_model.config.sequence_len
# each worker its own model copy: every request has its own KV cache, but a forward also writes
# module attributes (a MoE layer's aux_loss), so two threads never share a model
workers, seen_devices = [], set()
for d in devices:
    workers.append(Worker(models[d] if d not in seen_devices else copy.deepcopy(models[d]), d))
    seen_devices.add(d)
rel = os.path.relpath(checkpoint_dir, get_base_dir())
model_name = f"nanochat-{rel.replace(os.sep, '-').replace('_checkpoints', '')}-step{step}"
started = time.time()
loop = None          # the server's event loop (set at startup)
free_workers = None  # asyncio.Queue of idle workers
waiting = 0          # requests waiting for a worker

# ----------------------------------------------------------------------------- the app
@asynccontextmanager
async def lifespan(app):
    global loop, free_workers
    loop = asyncio.get_running_loop()
    free_workers = asyncio.Queue()
    for w in workers:
        free_workers.put_nowait(w)
    yield


app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)


@app.exception_handler(ApiError)
async def api_error(request, e):
    return e.response()


@app.exception_handler(StarletteHTTPException)
async def http_error(request, e):
    return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code="not_found"
                    if e.status_code == 404 else None, headers=getattr(e, "headers", None)).response()


@app.exception_handler(Exception)
async def unexpected_error(request, e):
    return ApiError(500, f"internal error: {type(e).__name__}").response()


@app.get("/")
async def index():
    with open(UI_PATH, encoding="utf-8") as f:
        return HTMLResponse(f.read(), headers={"Cache-Control": "no-cache"})


@app.get("/health")
async def health():
    return {"status": "ok", "model": model_name, "checkpoint": checkpoint_dir, "step": step,
            "device": ", ".join(sorted({str(w.device) for w in workers})), "context": context_len,
            "uptime_s": round(time.time() - started, 1), "workers": len(workers),
            "busy_workers": len(workers) - free_workers.qsize(), "queue_depth": waiting}


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


async def take_worker():
    """A free worker, or 503 + Retry-After after queue_timeout seconds (or at once when the queue is full)."""
    global waiting
    busy = {"Retry-After": str(retry_after)}
    if waiting >= max_queue:
        raise ApiError(503, f"the server is busy ({waiting} requests waiting); retry later", code="overloaded",
                       headers=busy)
    waiting += 1
    try:
        return await asyncio.wait_for(free_workers.get(), timeout=queue_timeout)
    except asyncio.TimeoutError:
        raise ApiError(503, f"all {len(workers)} workers stayed busy for {queue_timeout:g} s; retry later",
                       code="overloaded", headers=busy) from None
    finally:
        waiting -= 1


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    conversation, settings = parse_request(await read_body(request))
    prompt = await asyncio.to_thread(render_prompt, conversation, settings)  # long prompts: off the event loop
    if settings["seed"] is None:
        settings["seed"] = secrets.randbits(63)
    worker = await take_worker()
    if await request.is_disconnected():  # gave up while queued: do not generate for nobody
        free_workers.put_nowait(worker)
        return Response(status_code=499)
    events, cancelled = asyncio.Queue(), threading.Event()

    def emit(*event):
        loop.call_soon_threadsafe(events.put_nowait, event)

    try:
        threading.Thread(target=generate, args=(worker, prompt, settings, emit, cancelled), daemon=True).start()
    except BaseException:
        free_workers.put_nowait(worker)
        raise
    reply_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def usage(n):
        return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

    if settings["stream"]:
        def chunk(delta, finish=None, **extra):
            return "data: " + json.dumps({"id": reply_id, "object": "chat.completion.chunk", "created": created,
                                          "model": model_name, "choices": [{"index": 0, "delta": delta,
                                          "finish_reason": finish}], **extra}, ensure_ascii=False) + "\n\n"

        async def sse():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, *payload = await events.get()
                    if kind == "text":
                        yield chunk({"content": payload[0]})
                    elif kind == "done":
                        yield chunk({}, payload[0])
                        yield "data: " + json.dumps({"id": reply_id, "object": "chat.completion.chunk",
                                                     "created": created, "model": model_name, "choices": [],
                                                     "usage": usage(payload[1])}) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        yield "data: " + json.dumps({"error": {"message": payload[0], "type": "server_error",
                                                               "param": None, "code": None}}) + "\n\n"
                        return
            finally:  # also when the client went away and this generator was cancelled
                cancelled.set()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    pieces, next_check = [], time.monotonic() + 0.5
    try:
        while True:
            try:
                kind, *payload = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                kind = None
            if time.monotonic() >= next_check:  # twice a second: is the client still there?
                next_check = time.monotonic() + 0.5
                if await request.is_disconnected():
                    return Response(status_code=499)  # the finally below stops the thread
            if kind is None:
                continue
            if kind == "text":
                pieces.append(payload[0])
            elif kind == "done":
                break
            else:
                raise ApiError(500, payload[0])
    finally:
        cancelled.set()  # a no-op once done; stops the thread if this handler ends early
    return {"id": reply_id, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "finish_reason": "stop" if payload[0] == "stop" else "length"}],
            "usage": usage(payload[1])}


if __name__ == "__main__":
    print(f"chat_web: {model_name} ({checkpoint_dir} step {step}) on {', '.join(str(d) for d in devices)}, "
          f"{len(workers)} worker(s), context {context_len} tokens; http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", limit_concurrency=max_connections,
                timeout_keep_alive=30)
