"""
scripts/chat_web.py as a real server process on a loopback port: the official `openai` client
(non-streaming and streaming, n > 1, logprobs, stop, seed, include_usage, /v1/completions, API keys)
gets the replies a tiny model memorised in the fixture; the raw SSE stream; 16 concurrent streaming
clients each get their own reply from one batched engine; a client that disconnects mid-stream
frees its slot; a queue wait past the timeout gets 503 + Retry-After; a table of bad requests each
gets its 4xx in OpenAI's error shape while the server keeps serving.
Run: nice -n 10 python -m pytest tests/test_chat_web.py -q
"""
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import httpx
import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELLO = [{"role": "user", "content": "hello"}]
HELLO_REPLY = "Hello! I am nanochat, a tiny model."
SECOND = HELLO + [{"role": "assistant", "content": HELLO_REPLY}, {"role": "user", "content": "who made you?"}]
SECOND_REPLY = "I was trained from scratch in a test."
NIHAO = [{"role": "user", "content": "你好"}]
NIHAO_REPLY = "你好！我是 nanochat。"
COUNT = [{"role": "user", "content": "count"}]  # a long reply: keeps the slow server's one slot busy
COUNT_REPLY = "la " * 40
TOOL = [{"role": "user", "content": "How many r are in strawberry?"}]  # a python call: the server runs the sandbox
TOOL_PARTS = [{"type": "text", "text": "Let me count."}, {"type": "python", "text": "print('strawberry'.count('r'))"},
              {"type": "python_output", "text": "3"}, {"type": "text", "text": "The answer is 3."}]
TOOL_REPLY = "Let me count.\n[python]\nprint('strawberry'.count('r'))\n[output]\n3\n[/python]\nThe answer is 3."
TOOL_SECOND = TOOL + [{"role": "assistant", "content": TOOL_PARTS}, {"role": "user", "content": "thanks"}]
TOOL_SECOND_REPLY = "You are welcome."
CONVERSATIONS = [HELLO + [{"role": "assistant", "content": HELLO_REPLY}],
                 SECOND + [{"role": "assistant", "content": SECOND_REPLY}],
                 NIHAO + [{"role": "assistant", "content": NIHAO_REPLY}],
                 COUNT + [{"role": "assistant", "content": COUNT_REPLY}],
                 TOOL_SECOND + [{"role": "assistant", "content": TOOL_SECOND_REPLY}]]
SEQUENCE_LEN = 128


def make_base_dir(base):
    """A tokenizer and a tiny chatsft checkpoint that answers the CONVERSATIONS word for word
    (trained here until it has memorised them: a second or two on CPU)."""
    texts = [m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
             for c in CONVERSATIONS for m in c] * 20
    tokenizer = RustBPETokenizer.train_from_iterator(texts, 320)
    tokenizer.save(os.path.join(base, "tokenizer"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared machine
    try:
        torch.manual_seed(0)
        config = GPTConfig(sequence_len=SEQUENCE_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                           n_kv_head=2, n_embd=64)
        model = GPT(config)
        model.init_weights()
        rows = [tokenizer.render_conversation({"conversations": c}) for c in CONVERSATIONS]
        T = max(len(ids) for ids, _ in rows) - 1
        x = torch.zeros(len(rows), T, dtype=torch.long)
        y = torch.full((len(rows), T), -1, dtype=torch.long)
        for i, (ids, mask) in enumerate(rows):
            x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
            y[i, :len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
        for _ in range(300):
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if loss.item() < 0.005:
                break
        assert loss.item() < 0.05, f"the tiny model did not memorise its replies (loss {loss.item():.3f})"
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(os.path.join(base, "chatsft_checkpoints", "tiny"), 1, model.state_dict(), None,
                    {"model_config": asdict(config)})
    return tokenizer


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m scripts.chat_web` in a subprocess: started here, wait() until it answers, stop()."""

    def __init__(self, base, log_path, *args):
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "NANOCHAT_BASE_DIR": base, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--checkpoint=chatsft_checkpoints/tiny",
                                      f"--port={self.url.rsplit(':', 1)[1]}", *args],
                                     cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self):
        deadline = time.time() + 120  # importing torch on a busy 2-core machine can take a while
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chat_web exited with {self.proc.returncode}:\n{open(self.log_path).read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"chat_web did not come up in 120 s:\n{open(self.log_path).read()}")
            time.sleep(0.2)

    def health(self):
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("chat_web_base")
    tokenizer = make_base_dir(str(base))
    return str(base), tokenizer


@pytest.fixture(scope="module")
def servers(base_dir, tmp_path_factory):
    """Three servers, started side by side: "fast" (batched, small limits for the bad-request table),
    "slow" (one sequence at a time, 0.1 s per step: the 40-token reply holds it for about 4 s) and
    "keyed" (an API key)."""
    logs = tmp_path_factory.mktemp("logs")
    started = {
        "fast": Server(base_dir[0], logs / "fast.log", "--max_messages=8", "--max_message_chars=200",
                       "--max_max_tokens=120", "--max_body_bytes=20000"),
        "slow": Server(base_dir[0], logs / "slow.log", "--max_batch_size=1", "--slow_down=0.1", "--queue_timeout=0.5",
                       "--retry_after=7"),
        "keyed": Server(base_dir[0], logs / "keyed.log", "--api_key=s3cret", "--tools=calc"),
    }
    try:
        for s in started.values():
            s.wait()
        yield started
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers["fast"]


@pytest.fixture(scope="module")
def slow_server(servers):
    return servers["slow"]


def openai_client(server, api_key="not-needed"):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def stream_text(server, messages, **kw):
    chunks = list(openai_client(server).chat.completions.create(model="nanochat", messages=messages, stream=True,
                                                                 temperature=0, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# ----------------------------------------------------------------------------- answers
def test_openai_client_gets_the_memorised_replies(server, base_dir):
    tokenizer = base_dir[1]
    client = openai_client(server)
    for messages, reply in [(HELLO, HELLO_REPLY), (SECOND, SECOND_REPLY), (NIHAO, NIHAO_REPLY)]:
        r = client.chat.completions.create(model="whatever", messages=messages, temperature=0)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == reply
        assert r.choices[0].finish_reason == "stop"
        prompt = tokenizer.render_for_completion({"conversations": messages})
        completion = len(tokenizer.encode(reply)) + 1  # + <|assistant_end|>
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
            (len(prompt), completion, len(prompt) + completion)

        text, chunks = stream_text(server, messages, stream_options={"include_usage": True})
        assert text == reply
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == len(prompt) + completion
        assert len({c.id for c in chunks}) == 1

    # max_tokens cuts the reply: finish_reason "length"; a stop sequence cuts it at the stop
    r = client.chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert HELLO_REPLY.startswith(r.choices[0].message.content) and r.choices[0].message.content
    r = client.chat.completions.create(model="m", messages=HELLO, temperature=0, stop=["nano", "zzz"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Hello! I am ", "stop")
    text, _ = stream_text(server, HELLO, stop="tiny")
    assert text == "Hello! I am nanochat, a "
    # sampling: the same seed gives the same reply
    a, b = (client.chat.completions.create(model="m", messages=NIHAO, temperature=2.0, top_p=0.9, seed=7,
                                           max_tokens=20, extra_body={"top_k": 100}).choices[0].message.content
            for _ in range(2))
    assert a == b

    models = client.models.list().data
    assert len(models) == 1 and models[0].id.startswith("nanochat-chatsft-tiny")
    h = server.health()
    assert h["model"] == models[0].id and h["device"] == "cpu" and h["max_batch_size"] == 32
    assert h["queue_depth"] == 0 and h["active"] == 0 and h["uptime_s"] > 0 and h["tools"] == "python"


def test_python_tool_call_shows_in_the_reply_and_round_trips(server, servers):
    """The model writes a python call: the server runs it in the sandbox (the output is never the
    model's: it is not trained on it) and shows it as a [python] block; sent back, the block becomes
    the call and its output again, so the model sees its training conversation and answers the next turn."""
    client = openai_client(server)
    r = client.chat.completions.create(model="m", messages=TOOL, temperature=0)
    assert r.choices[0].message.content == TOOL_REPLY
    assert stream_text(server, TOOL)[0] == TOOL_REPLY
    resent = TOOL + [{"role": "assistant", "content": TOOL_REPLY}, {"role": "user", "content": "thanks"}]
    r = client.chat.completions.create(model="m", messages=resent, temperature=0)
    assert r.choices[0].message.content == TOOL_SECOND_REPLY
    assert servers["keyed"].health()["tools"] == "calc"  # --tools=calc


def test_tool_calls_round_trip_from_reply_text_to_tokens(base_dir):
    """Every shape of tool call the reply decoder writes parses back (openai_api.assistant_parts) to
    parts that render to the very tokens the model generated."""
    from nanochat.openai_api import assistant_parts
    from nanochat.reply import ReplyDecoder
    tokenizer = base_dir[1]
    sp = tokenizer.encode_special

    def call(code, output=None):
        out = [] if output is None else [sp("<|output_start|>"), *tokenizer.encode(output), sp("<|output_end|>")]
        return [sp("<|python_start|>"), *tokenizer.encode(code), sp("<|python_end|>"), *out]

    cases = [  # (reply tokens, how the reply reads)
        ([*tokenizer.encode("Sum:"), *call("12+30", "42"), *tokenizer.encode(" done")], "Sum:[calc: 12+30 = 42] done"),
        (call("12+30"), "[calc: 12+30 = ?]"),
        ([*tokenizer.encode("a"), *call("xs = [3, 1, 2]\nprint(sorted(xs))", "[1, 2, 3]"), *tokenizer.encode("b")],
         "a\n[python]\nxs = [3, 1, 2]\nprint(sorted(xs))\n[output]\n[1, 2, 3]\n[/python]\nb"),
        (call("x = 1", ""), "\n[python]\nx = 1\n[output]\n\n[/python]\n"),  # printed nothing
        ([*call("print(x)"), *tokenizer.encode("ok")], "\n[python]\nprint(x)\n[/python]\nok"),  # nothing came back
        ([*call("print(1)", "1"), *call("2*3", "6")], "\n[python]\nprint(1)\n[output]\n1\n[/python]\n[calc: 2*3 = 6]"),
    ]
    for ids, text in cases:
        decoder = ReplyDecoder(tokenizer)
        assert "".join(decoder.add(t) for t in ids) + decoder.finish() == text
        for sent in (text, text.strip()):  # a client may trim the message
            conversation = {"conversations": [{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": assistant_parts(sent)}]}
            rendered, _ = tokenizer.render_conversation(conversation)
            start = rendered.index(sp("<|assistant_start|>")) + 1
            assert rendered[start:-1] == ids, (text, assistant_parts(sent))


def test_n_choices_logprobs_and_completions(server, base_dir):
    tokenizer = base_dir[1]
    client = openai_client(server)
    r = client.chat.completions.create(model="m", messages=HELLO, temperature=0, n=3, logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2] and {c.message.content for c in r.choices} == {HELLO_REPLY}
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == HELLO_REPLY  # one entry per token (the stop token is not text)
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
               for e in content)
    assert all(bytes(e.bytes).decode() == e.token for e in content if e.token.isascii())
    assert r.usage.completion_tokens == 3 * (len(tokenizer.encode(HELLO_REPLY)) + 1)
    # n samples at a high temperature: different replies, the same ones again with the seed
    runs = [[c.message.content for c in client.chat.completions.create(
        model="m", messages=NIHAO, temperature=2.0, n=4, seed=11, max_tokens=12).choices] for _ in range(2)]
    assert runs[0] == runs[1] and len(set(runs[0])) > 1
    chunks = list(client.chat.completions.create(model="m", messages=HELLO, temperature=0, n=2, stream=True))
    for i in range(2):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i) \
            == HELLO_REPLY
    assert not any(c.usage for c in chunks)  # no include_usage: no usage chunk
    # /v1/completions: plain text after <|bos|>, no chat template (the chat model was trained on
    # chat turns only, so the continuation is whatever it is: greedy, the same streamed or not)
    c = client.completions.create(model="m", prompt="Hello! I am", temperature=0, max_tokens=12, logprobs=3)
    assert c.object == "text_completion" and c.choices[0].finish_reason in ("stop", "length")
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens - \
        (c.choices[0].finish_reason == "stop")
    assert all(len(top) <= 3 for top in lp.top_logprobs) and c.usage.prompt_tokens == 1 + len(tokenizer.encode("Hello! I am"))
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="m", prompt="Hello! I am", temperature=0, max_tokens=12, stream=True) if ch.choices)
    assert streamed == c.choices[0].text


def test_api_key_is_required_when_set(servers):
    keyed = servers["keyed"]
    from openai import AuthenticationError
    with pytest.raises(AuthenticationError) as e:
        openai_client(keyed, "wrong").chat.completions.create(model="m", messages=HELLO)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(keyed.url + "/v1/chat/completions", json={"messages": HELLO}, timeout=10)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(keyed.url + "/health", timeout=10).status_code == 200  # not behind the key
    r = openai_client(keyed, "s3cret").chat.completions.create(model="m", messages=HELLO, temperature=0)
    assert r.choices[0].message.content == HELLO_REPLY


def test_a_public_host_needs_a_key(base_dir):
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir[0]}
    r = subprocess.run([sys.executable, "-m", "scripts.chat_web", "--host=0.0.0.0", f"--port={free_port()}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--api_key" in r.stderr and "--allow_no_key" in r.stderr


def test_raw_stream_is_sse_chunks_ending_in_done(server):
    body = {"model": "m", "messages": NIHAO, "stream": True, "temperature": 0, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(e.startswith("data: ") for e in events)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == NIHAO_REPLY
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_16_concurrent_streaming_clients_each_get_their_own_reply(server):
    cases = [(HELLO, HELLO_REPLY), (NIHAO, NIHAO_REPLY), (SECOND, SECOND_REPLY)] * 6
    cases = cases[:16]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda case: stream_text(server, case[0])[0], cases))
    assert replies == [reply for _, reply in cases]
    h = server.health()
    assert h["active"] == 0 and h["queue_depth"] == 0


# ----------------------------------------------------------------------------- bad requests
def body(**kw):
    return json.dumps({"model": "m", "messages": HELLO, **kw})


def alternating(n):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(n)]


BAD_REQUESTS = [  # (name, raw body, status, a word the message must contain)
    ("malformed json", '{"messages": [', 400, "JSON"),
    ("not an object", "[1, 2]", 400, "object"),
    ("no messages", "{}", 400, "messages"),
    ("messages not a list", body(messages="hello"), 400, "messages"),
    ("empty messages", body(messages=[]), 400, "empty"),
    ("too many messages", body(messages=alternating(9)), 400, "limit is 8"),
    ("message too long", body(messages=[{"role": "user", "content": "x" * 201}]), 400, "limit is 200"),
    ("message not an object", body(messages=["hello"]), 400, "object"),
    ("unknown role", body(messages=[{"role": "tool", "content": "x"}]), 400, "role"),
    ("role not a string", body(messages=[{"role": 1, "content": "x"}]), 400, "role"),
    ("content not a string", body(messages=[{"role": "user", "content": 5}]), 400, "string"),
    ("content missing", body(messages=[{"role": "user"}]), 400, "content"),
    ("empty content", body(messages=[{"role": "user", "content": "  "}]), 400, "empty"),
    ("lone surrogate", '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "surrogate"),
    ("null content", body(messages=HELLO + [{"role": "assistant", "content": None}] + HELLO), 400, "NoneType"),
    ("image part", body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "text"),
    ("ends with assistant", body(messages=HELLO + [{"role": "assistant", "content": "hi"}]), 400, "last message"),
    ("two user turns", body(messages=HELLO + HELLO), 400, "out of order"),
    ("system not first", body(messages=HELLO + [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]),
     400, "system"),
    ("prompt over the context", body(messages=[{"role": "user", "content": "7 " * 99}]), 400, "context"),
    ("prompt + max_tokens over the context", body(messages=[{"role": "user", "content": "7 " * 10}], max_tokens=120),
     400, "context"),
    ("temperature not a number", body(temperature="hot"), 400, "temperature"),
    ("temperature too high", body(temperature=2.5), 400, "temperature"),
    ("temperature negative", body(temperature=-0.1), 400, "temperature"),
    ("temperature NaN", '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    ("top_p zero", body(top_p=0), 400, "top_p"),
    ("top_p above 1", body(top_p=1.5), 400, "top_p"),
    ("top_k negative", body(top_k=-1), 400, "top_k"),
    ("top_k not an integer", body(top_k=2.5), 400, "top_k"),
    ("max_tokens zero", body(max_tokens=0), 400, "max_tokens"),
    ("max_tokens too large", body(max_tokens=10 ** 9), 400, "max_tokens"),
    ("max_tokens a string", body(max_tokens="10"), 400, "max_tokens"),
    ("max_tokens a bool", body(max_tokens=True), 400, "max_tokens"),
    ("max_completion_tokens too large", body(max_completion_tokens=121), 400, "max_completion_tokens"),
    ("stream not a bool", body(stream="yes"), 400, "stream"),
    ("too many stops", body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("empty stop", body(stop=[""]), 400, "stop"),
    ("stop not a string", body(stop=5), 400, "stop"),
    ("seed negative", body(seed=-1), 400, "seed"),
    ("seed a string", body(seed="x"), 400, "seed"),
    ("n over the limit", body(n=9), 400, "'n' must be in [1, 8]"),
    ("n zero", body(n=0), 400, "'n'"),
    ("top_logprobs over 20", body(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("top_logprobs without logprobs", body(top_logprobs=2), 400, "top_logprobs"),
    ("logprobs on a stream", body(logprobs=True, stream=True), 400, "stream"),
    ("stream_options not an object", body(stream=True, stream_options=True), 400, "stream_options"),
    ("model not a string", body(model=5), 400, "model"),
    ("deeply nested", '{"messages": ' + "[" * 100000 + "]" * 100000 + "}", 413, "limit"),
    ("body too large", body(messages=[{"role": "user", "content": "x" * 30000}]), 413, "limit"),
    ("a 2 MB body", body(messages=[{"role": "user", "content": "x" * 2_000_000}]), 413, "limit"),
]
BAD_COMPLETIONS = [
    ("no prompt", {"max_tokens": 5}, 400, "prompt"),
    ("prompt over the context", {"prompt": "7 " * 99}, 400, "context"),
    ("echo", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("logprobs over 20", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
]


@pytest.mark.parametrize("name,raw,status,word", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_a_clear_4xx_and_the_server_keeps_serving(server, name, raw, status, word):
    r = httpx.post(server.url + "/v1/chat/completions", content=raw.encode(),
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and word in error["message"], error
    assert server.health()["active"] == 0


@pytest.mark.parametrize("name,body,status,word", BAD_COMPLETIONS, ids=[case[0] for case in BAD_COMPLETIONS])
def test_bad_completions_request_gets_a_clear_4xx(server, name, body, status, word):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert word in r.json()["error"]["message"]


def test_wrong_paths_and_methods_get_openai_shaped_errors_then_a_normal_reply(server):
    r = httpx.get(server.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    nested = '{"messages": ' + "[" * 5000 + "]" * 5000 + "}"  # under the body limit: the parser's recursion
    r = httpx.post(server.url + "/v1/chat/completions", content=nested, timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<textarea" in page.text and "http://" not in page.text and "https://" not in page.text  # no CDN
    r = openai_client(server).chat.completions.create(model="m", messages=HELLO, temperature=0)
    assert r.choices[0].message.content == HELLO_REPLY


# ----------------------------------------------------------------------------- queue and disconnects
def start_count_stream(slow_server):
    """Open a streaming request for the 40-token reply and read until its first text arrives."""
    client = httpx.Client(timeout=30)
    body = {"model": "m", "messages": COUNT, "stream": True, "temperature": 0, "max_tokens": 100}
    cm = client.stream("POST", slow_server.url + "/v1/chat/completions", json=body)
    r = cm.__enter__()
    assert r.status_code == 200
    lines = r.iter_lines()  # kept by the caller: dropping it would close the connection
    for line in lines:
        chunk = json.loads(line.removeprefix("data: ")) if line.startswith("data: {") else {}
        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            break
    return client, cm, lines


def wait_until_idle(server, limit):
    t0 = time.time()
    while time.time() - t0 < limit:
        h = server.health()
        if h["active"] == 0 and h["queue_depth"] == 0:
            return time.time() - t0
        time.sleep(0.05)
    raise AssertionError(f"the engine stayed busy for {limit} s: {server.health()}")


def test_a_client_that_disconnects_mid_stream_frees_its_slot(slow_server):
    client, cm, lines = start_count_stream(slow_server)
    assert slow_server.health()["active"] == 1
    time.sleep(0.5)
    assert slow_server.health()["active"] == 1  # still generating for the silent client
    cm.__exit__(None, None, None)  # hang up with ~35 tokens (~3.5 s of generation) still to go
    client.close()
    del lines
    assert wait_until_idle(slow_server, 2.0) < 2.0
    t0 = time.time()
    r = httpx.post(slow_server.url + "/v1/chat/completions", json={"model": "m", "messages": HELLO, "temperature": 0},
                   timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == HELLO_REPLY
    assert time.time() - t0 < 3.5  # ~12 tokens at 0.1 s: served at once, not after the abandoned reply

    # the same for a non-streaming request whose client gives up (its handler polls for the disconnect)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.url + "/v1/chat/completions", timeout=httpx.Timeout(30, read=0.8),
                   json={"model": "m", "messages": COUNT, "temperature": 0, "max_tokens": 100})
    assert wait_until_idle(slow_server, 2.0) < 2.0


def test_a_request_waiting_past_the_queue_timeout_gets_503_with_retry_after(slow_server):
    client, cm, lines = start_count_stream(slow_server)  # holds the only slot for ~4 s
    try:
        t0 = time.time()
        r = httpx.post(slow_server.url + "/v1/chat/completions", json={"model": "m", "messages": HELLO}, timeout=30)
        waited = time.time() - t0
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["code"] == "overloaded" and "busy" in r.json()["error"]["message"]
        assert 0.4 < waited < 3.0
    finally:
        cm.__exit__(None, None, None)
        client.close()
        del lines
    wait_until_idle(slow_server, 2.0)
    r = httpx.post(slow_server.url + "/v1/chat/completions", json={"model": "m", "messages": NIHAO, "temperature": 0},
                   timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == NIHAO_REPLY
