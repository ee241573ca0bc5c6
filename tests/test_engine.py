"""
Tests of nanochat.engine: KV-cached generation against full recomputation, sampling
(seed, top-k, top-p, repetition penalty), stop tokens, the calculator tool, the calculator, the python
tool (sandboxed, parked out of the batch while it runs, cancellable).

    nice -n 19 python -m pytest tests/test_engine.py -q

Hermetic: a tiny random GPT, a byte-level stand-in tokenizer whose special ids lie outside
the model's vocab (so random models never stop or call tools), a mock model that emits a
fixed script, and one tiny rustbpe tokenizer trained in-process on a fixed string.
"""
import pytest
import torch

from nanochat.engine import FINISHED, Engine, Sequence, apply_repetition_penalty, sample_next_token
from nanochat.gpt import GPT, GPTConfig, config_from_depth
from nanochat.kv_cache import KVCache
from nanochat.reply import ReplyDecoder
from nanochat.tools import calculator
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer

PROMPT = [72, 101, 108, 108, 111, 32, 119]


class ByteTokenizer:
    """Bytes are ids 0..255; special tokens 1000+ (never produced by a 256-vocab model)."""

    def encode_special(self, name):
        return 1000 + SPECIAL_TOKENS.index(name)

    def get_bos_token_id(self):
        return self.encode_special("<|bos|>")

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def tiny_gpt(depth=2, vocab_size=256, seed=0):
    """A random GPT whose attention and MLP matter (the default init zeroes the output
    projections, which would make the cache irrelevant) and whose logits are spread out
    (no near-ties for argmax to flip on rounding)."""
    torch.manual_seed(seed)
    model = GPT(config_from_depth(depth, vocab_size, sequence_len=64))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "wte" not in name:
                torch.nn.init.normal_(p, std=p.size(1) ** -0.5)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matmuls: thread-pool barriers cost more than they save, badly so on busy shared cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return tiny_gpt()


def uncached_generate(model, prompt, num_samples, max_tokens, temperature=0.0, top_k=None, top_p=None, seed=42):
    """The reference: recompute the full sequence every step, sample with the same helper and
    identically seeded generators (sample i: seed + i, as the engine does)."""
    out = []
    for i in range(num_samples):
        rng = torch.Generator().manual_seed(seed + i)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(max_tokens):
                logits = model(ids)[:, -1, :]
                nxt = sample_next_token(logits, rng, temperature, top_k, top_p)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
        out.append(ids[0, len(prompt):].tolist())
    return out


# ----------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("num_samples", [1, 3])
def test_kv_cached_greedy_equals_uncached(model, num_samples):
    engine = Engine(model, ByteTokenizer())
    results, masks = engine.generate_batch(PROMPT, num_samples=num_samples, max_tokens=24, temperature=0.0)
    expected = uncached_generate(model, PROMPT, 1, 24)[0]
    assert len(set(expected)) > 5, "degenerate reference: the test would not exercise the cache"
    assert results == [expected] * num_samples
    assert masks == [[1] * 24] * num_samples


def test_kv_cached_sampling_equals_uncached(model):
    # rows differ from the first sampled token on, so this checks the per-row cache copies
    engine = Engine(model, ByteTokenizer())
    results, _ = engine.generate_batch(PROMPT, num_samples=3, max_tokens=16, temperature=1.0, seed=7)
    assert len({tuple(r) for r in results}) == 3
    assert results == uncached_generate(model, PROMPT, 3, 16, temperature=1.0, seed=7)


# ----------------------------------------------------------------------------- sampling
def test_seed_reproducible_and_seeds_differ(model):
    engine = Engine(model, ByteTokenizer())
    kw = dict(num_samples=2, max_tokens=16, temperature=1.0, top_k=50, top_p=0.95)
    a, _ = engine.generate_batch(PROMPT, seed=1, **kw)
    b, _ = engine.generate_batch(PROMPT, seed=1, **kw)
    c, _ = engine.generate_batch(PROMPT, seed=2, **kw)
    assert a == b
    assert a != c


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    engine = Engine(model, ByteTokenizer())
    greedy, _ = engine.generate_batch(PROMPT, num_samples=2, max_tokens=16, temperature=0.0)
    k1, _ = engine.generate_batch(PROMPT, num_samples=2, max_tokens=16, temperature=1.0, top_k=1, seed=3)
    p0, _ = engine.generate_batch(PROMPT, num_samples=2, max_tokens=16, temperature=1.0, top_p=1e-6, seed=3)
    assert k1 == greedy and p0 == greedy


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    rng = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, rng, top_p=0.7).item() for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
    draws = {sample_next_token(logits, rng, top_k=3).item() for _ in range(300)}
    assert draws == {0, 1, 2}


def test_top_k_samples_the_renormalised_distribution_per_row():
    # top-k draws among the k largest only: their probabilities renormalised, mapped back to vocab ids
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.3, 0.05, 0.15, 0.5]])
    rng = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next_token(probs.log(), rng, top_k=2) for _ in range(4000)])  # (4000, 2)
    assert set(draws[:, 0].tolist()) == {1, 3} and set(draws[:, 1].tolist()) == {0, 3}
    assert abs((draws[:, 0] == 1).float().mean().item() - 0.625) < 0.03  # 0.5 / (0.5 + 0.3)
    assert abs((draws[:, 1] == 3).float().mean().item() - 0.625) < 0.03
    cold = torch.stack([sample_next_token(probs.log(), rng, temperature=0.5, top_k=2) for _ in range(4000)])
    assert abs((cold[:, 0] == 1).float().mean().item() - 0.25 / 0.34) < 0.03  # p^2 renormalised: 0.5^2 / (0.5^2 + 0.3^2)


def test_repetition_penalty_hand_made():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_repetition_penalty_in_engine(model):
    # a huge penalty drives every seen token's logit to <= ~0: greedy then avoids the prompt
    # and its own output while unseen tokens with positive logits remain
    engine = Engine(model, ByteTokenizer())
    plain, _ = engine.generate_batch(PROMPT, max_tokens=16, temperature=0.0)
    penalized, _ = engine.generate_batch(PROMPT, max_tokens=16, temperature=0.0, repetition_penalty=1e6)
    assert penalized != plain
    assert len(set(penalized[0])) == 16 and not set(penalized[0]) & set(PROMPT)


# ----------------------------------------------------------------------------- mock model
class ScriptedModel:
    """Emits scripts[row][i] as the i-th generated token (position-based, so forced tokens
    consume script entries). Uses a real KVCache so prefill/copy are exercised."""

    def __init__(self, scripts, prompt_len, vocab_size, sequence_len=64):
        self.scripts, self.prompt_len = scripts, prompt_len
        self.config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)

    def get_device(self):
        return torch.device("cpu")

    def __call__(self, ids, kv_cache, logits_at=None):  # the logits are set at the last position either way
        B, T = ids.shape
        ends = [kv_cache.end(T)] * B if isinstance(kv_cache, KVCache) else (kv_cache.pos[:B] + T).tolist()
        kv_cache.insert_kv(0, torch.zeros(B, 1, T, 2), torch.zeros(B, 1, T, 2))
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            i = ends[b] - self.prompt_len  # index of the token to predict
            script = self.scripts[min(b, len(self.scripts) - 1)]
            logits[b, -1, script[min(i, len(script) - 1)]] = 10.0
        return logits


@pytest.fixture(scope="module")
def tok():
    text = "The answer is 42. Let me compute 12 + 30 with the tool. hello world " * 40
    return RustBPETokenizer.train_from_iterator([text], 320)


def test_stop_on_assistant_end_and_bos(tok):
    end, bos = tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()
    a, b, c = tok.encode("abc")
    scripts = [[a, b, end, c, c, c], [a, bos, c, c, c, c], [a, b, c, c, c, c]]
    engine = Engine(ScriptedModel(scripts, 3, tok.get_vocab_size()), tok)
    steps = list(engine.generate([a, b, c], num_samples=3, max_tokens=5, temperature=0.0))
    assert [col for col, _ in steps] == [[a, a, a], [b, bos, b], [end, FINISHED, c],
                                         [FINISHED, FINISHED, c], [FINISHED, FINISHED, c]]
    assert [m for _, m in steps] == [[1, 1, 1], [1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 0, 1]]
    results, _ = engine.generate_batch([a, b, c], num_samples=3, max_tokens=5, temperature=0.0)
    assert results == [[a, b], [a], [a, b, c, c, c]]
    # all samples finished: the generator ends before max_tokens
    engine = Engine(ScriptedModel([scripts[0]], 3, tok.get_vocab_size()), tok)
    assert [t for t, _ in engine.stream([a, b, c], max_tokens=50, temperature=0.0)] == [a, b, end]


def test_tool_use_forces_calculator_output(tok):
    sp = tok.encode_special
    expr, tail = tok.encode("12 + 30"), tok.encode("The answer is 42.")
    forced = [sp("<|output_start|>"), *tok.encode("42"), sp("<|output_end|>")]
    filler = tok.encode("x")[0]
    script = [sp("<|python_start|>"), *expr, sp("<|python_end|>"), *[filler] * len(forced), *tail,
              sp("<|assistant_end|>")]
    prompt = tok.render_for_completion({"conversations": [{"role": "user", "content": "What is 12 plus 30?"}]})
    engine = Engine(ScriptedModel([script], len(prompt), tok.get_vocab_size()), tok)
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=100, temperature=0.0)
    expected = [sp("<|python_start|>"), *expr, sp("<|python_end|>"), *forced, *tail]
    assert results == [expected, expected]
    n = len(expr) + 2
    assert masks[0] == [1] * n + [0] * len(forced) + [1] * len(tail)
    assert "<|output_start|>42<|output_end|>" in tok.decode(results[0]).replace(" ", "")


def test_refused_tool_call_forces_nothing(tok):
    sp = tok.encode_special
    expr = tok.encode("hello")  # a name: refused
    script = [sp("<|python_start|>"), *expr, sp("<|python_end|>"), sp("<|assistant_end|>")]
    engine = Engine(ScriptedModel([script], 1, tok.get_vocab_size()), tok, tools="calc")
    results, masks = engine.generate_batch([tok.get_bos_token_id()], max_tokens=20, temperature=0.0)
    assert results == [script[:-1]] and masks == [[1] * len(script[:-1])]
    # tools="none": not even the calculator runs
    script = [sp("<|python_start|>"), *tok.encode("12 + 30"), sp("<|python_end|>"), sp("<|assistant_end|>")]
    engine = Engine(ScriptedModel([script], 1, tok.get_vocab_size()), tok, tools="none")
    results, masks = engine.generate_batch([tok.get_bos_token_id()], max_tokens=20, temperature=0.0)
    assert results == [script[:-1]] and masks == [[1] * len(script[:-1])]
    with pytest.raises(ValueError, match="tools"):
        Engine(ScriptedModel([script], 1, tok.get_vocab_size()), tok, tools="calculator")


# ----------------------------------------------------------------------------- the python tool
def python_call(tok, code, prompt_len=1, tail=(), **engine_kw):
    """One reply that calls python with `code`, then says `tail`: -> (engine, generated ids, masks)."""
    sp = tok.encode_special
    script = [sp("<|python_start|>"), *tok.encode(code), sp("<|python_end|>"), *[tok.encode("x")[0]] * 300,
              sp("<|assistant_end|>")]
    forced_at = len(tok.encode(code)) + 2
    script = script[:forced_at] + [*tail] + [sp("<|assistant_end|>")]  # the output is forced over what follows
    engine = Engine(ScriptedModel([script], prompt_len, tok.get_vocab_size(), sequence_len=512), tok, **engine_kw)
    results, masks = engine.generate_batch([tok.get_bos_token_id()], max_tokens=400, temperature=0.0)
    return engine, results[0], masks[0]


def forced_output(tok, ids, masks):
    """The text between <|output_start|> and <|output_end|>, checking those tokens were forced (mask 0)."""
    start, end = ids.index(tok.encode_special("<|output_start|>")), ids.index(tok.encode_special("<|output_end|>"))
    assert set(masks[start:end + 1]) == {0} and masks[start - 1] == 1
    return tok.decode(ids[start + 1:end])


def test_python_call_runs_in_the_sandbox_and_its_output_is_fed_back(tok):
    engine, ids, masks = python_call(tok, "n = 6 * 7\nprint(f'{n} is the answer')")
    assert forced_output(tok, ids, masks) == "42 is the answer"
    decoder = ReplyDecoder(tok)
    text = "".join(decoder.add(t) for t in ids) + decoder.finish()
    assert text.startswith("\n[python]\nn = 6 * 7\nprint(f'{n} is the answer')\n[output]\n42 is the answer\n[/python]\n")
    # a failing call feeds back the error's last line; the calculator keeps plain arithmetic in-process
    _, ids, masks = python_call(tok, "print(1)\nprint(1 / 0)")
    assert forced_output(tok, ids, masks) == "1\nZeroDivisionError: division by zero"
    engine, ids, masks = python_call(tok, "'strawberry'.count('r')")
    assert forced_output(tok, ids, masks) == "3" and engine.tool_pool is None  # no sandbox was started
    # tools="calc": the same code gets no output
    _, ids, masks = python_call(tok, "print(6 * 7)", tools="calc")
    assert tok.encode_special("<|output_start|>") not in ids


def test_python_time_limit_and_output_cap(tok):
    _, ids, masks = python_call(tok, "while True:\n    pass", python_timeout=0.5)
    assert forced_output(tok, ids, masks) == "timed out after 0.5 s"
    _, ids, masks = python_call(tok, "for i in range(1000):\n    print(i)", max_output_tokens=16)
    out = forced_output(tok, ids, masks)
    assert out.startswith("0\n1\n2") and out.endswith("\n[output cut at 16 tokens]") and "999" not in out
    assert len(tok.encode(out)) < 16 + len(tok.encode("\n[output cut at 16 tokens]")) + 4


class NoSpecials:
    """A random GPT with room in its vocab for ByteTokenizer's special ids (so they can be fed as
    forced tokens) that never samples one: the random model never stops or calls a tool by itself."""

    def __init__(self, model):
        self.model, self.config, self.cos = model, model.config, model.cos

    def get_device(self):
        return self.model.get_device()

    def __call__(self, ids, kv_cache=None, logits_at=None):
        logits = self.model(ids, kv_cache=kv_cache, logits_at=logits_at)
        logits[..., 256:] = float("-inf")
        return logits


def forced_call(seq, code, output=None):
    """Make `seq` open its reply with a python call of `code` (and, for a reference run without
    tools, the output the call gave), fed as forced tokens as a tool's output is."""
    tok = ByteTokenizer()
    sp = tok.encode_special
    seq._forced.extend([sp("<|python_start|>"), *tok.encode(code), sp("<|python_end|>")])
    if output is not None:
        seq._forced.extend([sp("<|output_start|>"), *tok.encode(output), sp("<|output_end|>")])
    return seq


def test_a_python_call_does_not_stall_the_batch():
    """One sequence's python call sleeps for a second: it is parked out of the batch while 8 others go on
    decoding; its keys and values come back intact (its continuation equals a run that never parked),
    and the others' greedy tokens equal their runs alone."""
    model = NoSpecials(tiny_gpt(vocab_size=1024))
    code = "import time\ntime.sleep(1.0)\nprint('done')"
    prompts = [[(7 * i + j) % 250 + 1 for j in range(3 + 2 * i)] for i in range(8)]
    others = [Sequence(p, 100, temperature=0.0) for p in prompts]
    caller = forced_call(Sequence(PROMPT, len(code) + 2 + 20, temperature=0.0), code)
    engine = Engine(model, ByteTokenizer(), max_batch_size=9)
    engine.submit([caller])
    for s in others:
        engine.submit([s])
    steps_parked, progress = 0, None
    while not all(s.done for s in [caller, *others]):
        engine.step()
        if caller in engine.parked:
            steps_parked += 1
            progress = progress or [len(s.tokens) for s in others]
            assert len(engine.rows) + len(engine.parked) <= 9 and caller not in engine.rows
        elif progress and len(progress) == len(others):
            progress = [len(s.tokens) - n for s, n in zip(others, progress)]  # tokens made while it was parked
            progress.append("resumed")
    assert progress[-1] == "resumed" and min(progress[:-1]) >= 20, progress
    assert steps_parked < 200  # with nothing else to do, the engine waits on the call instead of spinning
    assert caller.masks.count(0) == len(code) + 2 + len("done") + 2 and caller.finish_reason == "length"
    reference = forced_call(Sequence(PROMPT, len(code) + 2 + 20, temperature=0.0), code, output="done")
    Engine(model, ByteTokenizer(), tools="none").run([reference])
    assert caller.tokens == reference.tokens and caller.masks == reference.masks
    for s, p in zip(others, prompts):
        alone = Sequence(p, 100, temperature=0.0)
        Engine(model, ByteTokenizer(), max_batch_size=1).run([alone])
        assert s.tokens == alone.tokens
    assert not engine.has_work()


def test_generate_waits_for_a_sample_whose_python_call_runs():
    # generate's token columns: a sample parked for its call lags the others, and loses no token
    model = NoSpecials(tiny_gpt(vocab_size=1024))
    engine = Engine(model, ByteTokenizer())
    submit = engine.submit
    engine.submit = lambda seqs: submit([forced_call(seqs[0], "import time\ntime.sleep(0.3)\nprint(1)"), *seqs[1:]])
    columns = list(engine.generate(PROMPT, num_samples=2, max_tokens=60, temperature=0.0))
    assert len(columns) == 60 and FINISHED not in [t for column, _ in columns for t in column]
    first = [column[0] for column, _ in columns]
    sp = ByteTokenizer().encode_special
    assert first[first.index(sp("<|output_start|>")):][:3] == [sp("<|output_start|>"), ord("1"), sp("<|output_end|>")]
    alone = Sequence(PROMPT, 60, temperature=0.0, seed=43)  # sample 1 never called: its tokens as alone
    Engine(model, ByteTokenizer()).run([alone])
    assert [column[1] for column, _ in columns] == alone.tokens


def test_a_full_batch_waits_for_a_python_call_without_spinning():
    # max_batch_size 1: the parked caller keeps its place, so the next prompt waits for it to finish
    model = NoSpecials(tiny_gpt(vocab_size=1024))
    engine = Engine(model, ByteTokenizer(), max_batch_size=1)
    caller = forced_call(Sequence(PROMPT, 40, temperature=0.0), "import time\ntime.sleep(0.5)")
    queued = Sequence(PROMPT[:3], 5, temperature=0.0)
    engine.submit([caller])
    engine.submit([queued])
    steps = 0
    while not caller.done:
        engine.step()
        steps += 1
        assert not queued.tokens or caller.done  # never two in a batch of one
    assert steps < 120 and caller.finish_reason == "length"  # ~0.5 s / 50 ms of waiting, plus 40 tokens
    engine.run([queued])
    assert len(queued.tokens) == 5


def test_cancelling_a_sequence_whose_python_call_runs_kills_the_code():
    model = NoSpecials(tiny_gpt(vocab_size=1024))
    engine = Engine(model, ByteTokenizer(), python_timeout=60.0)
    discarded, cancelled, other = (forced_call(Sequence(PROMPT, 100, temperature=0.0), "while True:\n    pass"),
                                   forced_call(Sequence(PROMPT[:4], 100, temperature=0.0), "while True:\n    pass"),
                                   Sequence(PROMPT[:5], 30, temperature=0.0))
    for s in (discarded, cancelled, other):
        engine.submit([s])
    while len(engine.parked) < 2:
        engine.step()
    calls = [discarded._call, cancelled._call]
    engine.discard([discarded])  # from the stepping thread (a consumer stopped reading)
    cancelled.cancel()  # from another thread (a client hung up): taken out at the next step
    engine.step()
    assert discarded.finish_reason == cancelled.finish_reason == "cancelled" and not engine.parked
    assert [c.result(timeout=10) for c in calls] == ["stopped", "stopped"]  # killed, not left running 60 s
    engine.run([other])
    assert len(other.tokens) == 30 and not engine.has_work()


# ----------------------------------------------------------------------------- calculator
@pytest.mark.parametrize("expr, expected", [
    ("1+2", "3"), ("12 + 30", "42"), ("84 / 2", "42"), ("7 // 2", "3"), ("-7 % 3", "2"), ("2 ** 10", "1024"),
    ("(3 + 4) * -2", "-14"), ("1 / 3", "0.333333333333"), ("2.5 * 4", "10"), ("+5 - 0.5", "4.5"),
    ("'strawberry'.count('r')", "3"), ("'Hello'.upper()", "HELLO"), ("'Hello'.lower()", "hello"),
    ("'  hi '.strip()", "hi"), ("'banana'.replace('a', 'o')", "bonono"), ("'a,b'.split(',')", "['a', 'b']"),
    ("'banana'.find('n')", "2"), ("len('hello')", "5"), ("'ab' + 'cd'", "abcd"),
])
def test_calculator_computes(expr, expected):
    assert calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "x", "x + 1", "__import__('os').system('true')", "import os", "().__class__", "().__class__.__bases__[0]",
    "'a'.__class__", "(1).real", "open('f')", "print(1)", "eval('1')", "len", "'abc'[0]", "[1, 2]",
    "lambda: 1", "(lambda: 1)()", "[c for c in 'abc']", "{1: 2}", "9 ** 9 ** 9", "2 ** 100000", "10 ** 1000 * 10 ** 1000",
    "'a' * 10", "'%s' % 5", "1 / 0", "1e308 * 10", "(-8) ** 0.5", "len(5)", "'a'.count(x)", "'a'.format(1)",
    "'a'.join(['b'])", "1 if 1 else 2", "1 < 2", "True + 1", "", "1 +", "'x'.upper(key=1)", "a := 1", "9" * 5000,
])
def test_calculator_refuses(expr):
    assert calculator(expr) is None


def test_reply_decoder_holds_back_split_characters_and_shows_tool_calls(tok):
    # "é" is two bytes, i.e. two tokens of the byte tokenizer: never shown half
    byte_tok = ByteTokenizer()
    decoder = ReplyDecoder(byte_tok)
    pieces = [decoder.add(t) for t in [*byte_tok.encode("aé€b"), byte_tok.encode_special("<|assistant_end|>")]]
    assert [p for p in pieces if p] == ["a", "é", "€", "b"] and decoder.done
    sp = tok.encode_special
    decoder = ReplyDecoder(tok)
    ids = [*tok.encode("Let me compute."), sp("<|python_start|>"), *tok.encode("12 + 30"), sp("<|python_end|>"),
           sp("<|output_start|>"), *tok.encode("42"), sp("<|output_end|>"), *tok.encode(" The answer is 42.")]
    assert "".join(decoder.add(t) for t in ids) + decoder.finish() == \
        "Let me compute.[calc: 12 + 30 = 42] The answer is 42."


def test_an_unclosed_tool_call_never_shows_special_tokens(tok):
    # seen on the CPU RL model: a call the model never closed printed "<|assistant_end|>" in the reply
    sp = tok.encode_special
    decoder = ReplyDecoder(tok)
    ids = [*tok.encode("hello"), sp("<|python_start|>"), *tok.encode("the answer"), sp("<|assistant_end|>"),
           *tok.encode("more")]
    text = "".join(decoder.add(t) for t in ids) + decoder.finish()
    assert text == "hello\n[python]\nthe answer\n[/python]\n" and "<|" not in text  # no [output]: none came back
    decoder = ReplyDecoder(tok)
    ids = [sp("<|python_start|>"), *tok.encode("12 + 30"), sp("<|python_end|>"), sp("<|assistant_end|>")]
    assert "".join(decoder.add(t) for t in ids) + decoder.finish() == "[calc: 12 + 30 = ?]"
    hidden = ReplyDecoder(tok, show_thinking=False)
    ids = [sp("<think>"), *tok.encode("hmm"), sp("</think>"), *tok.encode("42"), sp("<|user_start|>")]
    assert "".join(hidden.add(t) for t in ids) + hidden.finish() == "42"
    shown = ReplyDecoder(tok)
    assert "".join(shown.add(t) for t in ids) + shown.finish() == "<think>hmm</think>\n42"


# ----------------------------------------------------------------------------- continuous batching
@pytest.mark.parametrize("max_step_tokens", [40, 1024])
def test_greedy_output_is_the_same_alone_and_among_31_others(model, max_step_tokens):
    """Sequences of different lengths decoded together, joining and leaving at different steps:
    each one's greedy tokens equal its tokens when it runs alone (fp32, CPU). With 40 tokens per
    step the prefills spread over steps (a few short prompts per forward); with 1024 all 32
    prompts are prefilled together in the first forward, right-padded."""
    prompts = [[(7 * i + j) % 250 + 1 for j in range(3 + (5 * i) % 23)] for i in range(32)]
    lengths = [8 + (11 * i) % 25 for i in range(32)]
    alone = []
    for p, n in zip(prompts, lengths):
        seq = Sequence(p, n, temperature=0.0)
        Engine(model, ByteTokenizer(), max_batch_size=1).run([seq])
        alone.append(seq.tokens)
    together = [Sequence(p, n, temperature=0.0) for p, n in zip(prompts, lengths)]
    engine = Engine(model, ByteTokenizer(), max_batch_size=32, max_step_tokens=max_step_tokens)
    calls = []
    hook = model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    try:
        engine.run(together)
    finally:
        hook.remove()
    assert [s.tokens for s in together] == alone
    if max_step_tokens == 1024:
        assert calls[0] == (32, max(len(p) for p in prompts))  # one forward prefilled them all
        assert len(calls) == 1 + max(lengths) - 1  # then one decode forward per step
    assert all(len(s.tokens) == n and s.finish_reason == "length" for s, n in zip(together, lengths))
    assert not engine.rows and not engine.waiting


def test_per_sequence_settings_seed_and_logprobs(model):
    engine = Engine(model, ByteTokenizer(), max_batch_size=8)
    a = Sequence(PROMPT, 12, temperature=1.0, seed=5, logprobs=3)
    b = Sequence(PROMPT, 12, temperature=0.0, logprobs=0)
    c = Sequence(PROMPT[:3], 5, temperature=1.0, top_k=1)  # top-k 1 is greedy
    engine.run([a, b, c])
    assert b.tokens == uncached_generate(model, PROMPT, 1, 12)[0]
    assert c.tokens == uncached_generate(model, PROMPT[:3], 1, 5)[0]
    assert a.tokens == uncached_generate(model, PROMPT, 1, 12, temperature=1.0, seed=5)[0]
    with torch.no_grad():  # logprobs are the model's own log-softmax at each position
        logits = model(torch.tensor([PROMPT + b.tokens]))[0, len(PROMPT) - 1:-1]
    logp = torch.log_softmax(logits, dim=-1)
    assert all(abs(lp - float(logp[i, t])) < 1e-4 for i, (t, lp, top) in enumerate(b.token_logprobs))
    assert all(len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] for _, _, top in a.token_logprobs)


def test_stop_strings_cancel_and_prefill_chunks(tok):
    a, b, c = tok.encode("abc")
    text_ids = tok.encode("The answer is 42. hello world")
    script = [*text_ids, tok.encode_special("<|assistant_end|>")]
    engine = Engine(ScriptedModel([script], 3, tok.get_vocab_size()), tok, max_step_tokens=2)  # a 3-token prompt: 2 steps
    events = []
    seq = Sequence([a, b, c], 50, temperature=0.0, stop=["42."], on_event=lambda *e: events.append(e))
    engine.run([seq])
    assert seq.text == "The answer is " and seq.finish_reason == "stop" and events[-1] == ("done", "stop")
    assert "".join(p for kind, p in events if kind == "text") == "The answer is "
    gone = Sequence([a, b, c], 50, temperature=0.0)
    engine.submit([gone])
    engine.step()
    gone.cancel()
    engine.step()
    assert gone.finish_reason == "cancelled" and not engine.rows



def test_run_sizes_the_row_cache_once(model, monkeypatch):
    """run() knows how long its sequences can get: the row cache is allocated once at that size,
    not grown 256 tokens at a time (each growth zero-fills and copies the whole cache)."""
    from nanochat import kv_cache
    allocations = []
    real_reserve = kv_cache.RowKVCache._reserve

    def reserve(self, length, dtype):
        before = self.kv
        real_reserve(self, length, dtype)
        if self.kv is not before:
            allocations.append(self.kv.size(4))
    monkeypatch.setattr(kv_cache.RowKVCache, "_reserve", reserve)
    engine = Engine(model, ByteTokenizer(), max_batch_size=4)
    seqs = [Sequence(PROMPT, 300 + i, temperature=0.0) for i in range(3)]
    engine.run(seqs)
    assert [len(s.tokens) for s in seqs] == [300, 301, 302]
    assert allocations == [512]  # prompt + 302 tokens: one allocation, never grown
