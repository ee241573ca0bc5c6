"""
Tests of the rustbpe extension: round trips, tiktoken equality, merges against a
pure-Python BPE reference, determinism, errors and special tokens.

    python -m pytest tests/test_rustbpe.py -q

The tiktoken-equality test reads the offline corpus (`python -m nanochat.dataset` builds it).
"""
import inspect
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
import regex
import rustbpe
import tiktoken
from hypothesis import given, settings, strategies as st

from nanochat.dataset import parquets_iter_batched

PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

SAMPLE = ("Hello world! It's 2025: 12345 items cost $6.78.\n\n  def f(x):\n\treturn x**2  \r\n"
          "你好，世界！今天天气很好，我们去公园散步吧。「引号」和《书名》。 🙂👍🏽 e\u0301 \x00\x1b[0m\u200b")


def synthetic_text(seed=0, n_words=20000):
    """Mixed English-ish / Chinese / digits / punctuation from a small alphabet, so
    pair counts collide a lot (ties) and every pattern branch is hit."""
    rng = random.Random(seed)
    pieces = ["a", "b", "ab", "ba", "the", "he", "你", "好", "你好", "世界", "1", "23", "456", "!", "?!", "'s", "'ll",
              "\n", "  ", "\t", "🙂", "é", "Ab", "AB"]
    words = []
    for _ in range(n_words):
        words.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 4))))
    return " ".join(words)


def is_chinese(text):
    cjk = sum(1 for c in text[:2000] if "\u4e00" <= c <= "\u9fff")
    return cjk > 0.2 * min(len(text), 2000)


def mixed_corpus(data_dir, en_chars, zh_chars, split="train"):
    """English and Chinese documents from the shards, interleaved."""
    en, zh, n_en, n_zh = [], [], 0, 0
    for batch in parquets_iter_batched(split=split, data_dir=data_dir):
        for doc in batch:
            if is_chinese(doc):
                if n_zh < zh_chars:
                    zh.append(doc)
                    n_zh += len(doc)
            elif n_en < en_chars:
                en.append(doc)
                n_en += len(doc)
        if n_en >= en_chars and n_zh >= zh_chars:
            break
    assert n_en >= en_chars and n_zh >= zh_chars, \
        f"corpus in {data_dir} too small: {n_en} English / {n_zh} Chinese chars"
    docs = en + zh
    random.Random(0).shuffle(docs)
    return docs


def train(texts, vocab_size, pattern=PATTERN, buffer_size=8192):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, buffer_size=buffer_size, pattern=pattern)
    return tok


def to_tiktoken(tok, special_tokens=None):
    return tiktoken.Encoding(name="test", pat_str=tok.get_pattern(),
                             mergeable_ranks=dict(tok.get_mergeable_ranks()),
                             special_tokens=special_tokens or {})


@pytest.fixture(scope="module")
def small_tok():
    return train([synthetic_text(1), SAMPLE * 20], 600)


@pytest.fixture(scope="module")
def small_enc(small_tok):
    return to_tiktoken(small_tok)


# ------------------------------------------------------------------ a pure-Python BPE reference
def reference_bpe(texts, vocab_size, pattern=PATTERN):
    """Textbook byte-level BPE: recount every pair from scratch before each merge.
    Pairs are counted with overlaps (weighted by chunk count); the winner is the highest
    count, ties to the smallest (left, right) id pair; a merge replaces occurrences left
    to right without overlap. Returns the merged tokens' bytes in merge order and how many
    merges were decided by a tie."""
    chunk_counts = Counter()
    for text in texts:
        chunk_counts.update(regex.findall(pattern, text))
    words = {tuple(c.encode("utf-8")): n for c, n in chunk_counts.items()}
    token_bytes = [bytes([i]) for i in range(256)]
    merged, ties = [], 0
    while len(token_bytes) < vocab_size:
        pairs = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        top = max(pairs.values())
        candidates = sorted(p for p, n in pairs.items() if n == top)
        ties += len(candidates) > 1
        a, b = candidates[0]
        new_id = len(token_bytes)
        token_bytes.append(token_bytes[a] + token_bytes[b])
        merged.append(token_bytes[-1])
        new_words = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = n
        words = new_words
    return merged, ties


def trained_merges(tok):
    ranks = sorted(tok.get_mergeable_ranks(), key=lambda br: br[1])
    assert [r for _, r in ranks] == list(range(len(ranks)))
    assert [b for b, _ in ranks[:256]] == [bytes([i]) for i in range(256)]
    return [b for b, _ in ranks[256:]]


def test_merges_equal_reference_on_tie_heavy_corpus():
    texts = [synthetic_text(seed) for seed in range(2)]
    tok = train(texts, 256 + 200)
    ref, ties = reference_bpe(texts, 256 + 200)
    assert ties >= 20, f"corpus should exercise ties, only {ties} merges were ties"
    assert trained_merges(tok) == ref


def test_merges_equal_reference_on_real_text(default_data_dir):
    texts = mixed_corpus(default_data_dir, 25_000, 10_000, split="val")
    tok = train(texts, 256 + 200, buffer_size=7)  # odd buffer size: batching must not matter
    ref, ties = reference_bpe(texts, 256 + 200)
    assert ties >= 20, f"only {ties} ties"
    assert trained_merges(tok) == ref


def test_default_pattern():
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(["hello 12345"]), 260)
    assert tok.get_pattern() == PATTERN  # GPT-4's, with numbers in groups of 1-2 digits
    assert tok.encode("12345") == to_tiktoken(tok).encode_ordinary("12345")


def test_stops_when_no_pairs_left():
    tok = train(["ab ab ab"], 1000)
    assert trained_merges(tok) == reference_bpe(["ab ab ab"], 1000)[0]
    assert tok.vocab_size == 256 + len(trained_merges(tok))


# ------------------------------------------------------------------ tiktoken equality
def test_ids_equal_tiktoken_on_multi_mb_corpus(default_data_dir):
    docs = mixed_corpus(default_data_dir, 2_000_000, 1_000_000)
    tok = train(docs[: len(docs) // 3], 4096)
    enc = to_tiktoken(tok)
    ours = tok.batch_encode(docs)
    ref = enc.encode_ordinary_batch(docs)
    bad = [i for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
    assert not bad, f"{len(bad)} of {len(docs)} docs differ, first: {docs[bad[0]][:200]!r}"
    big = "\n".join(docs[:300])  # one long string through the single-string path
    assert tok.encode(big) == enc.encode_ordinary(big)
    assert sum(len(d) for d in docs) >= 3_000_000


def test_ids_equal_tiktoken_on_edge_cases(small_tok):
    enc = to_tiktoken(small_tok)
    cases = [SAMPLE, "", " ", "   x", "\n\n\n", " \n \n", "a  \n", "123456789", "x'S'LL'Ve", "'",
             "!!!\n\n", "你好123abc", "\r\n\r\n", "   \t\t  end", "é" * 50, "🙂" * 20, "\x00\x01\x02"]
    for text in cases:
        assert small_tok.encode(text) == enc.encode_ordinary(text), repr(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_ids_equal_tiktoken_property(small_tok, small_enc, text):
    assert small_tok.encode(text) == small_enc.encode_ordinary(text)


# pieces that sit on the split pattern's edges: whitespace runs before words and line ends,
# contractions in any case, digit runs, punctuation runs with newlines, non-ASCII letters,
# numbers and spaces (NBSP, ideographic space, line separator), combining marks
EDGE_PIECES = [" ", "  ", "   ", "\n", "\r\n", "\r", "\t", "\x0b", "\x0c", "\u00a0", "\u3000", "\u2028", "\u0085",
               "'", "'s", "'S", "'ll", "'LL", "'Ve", "'re", "'d", "'t", "'m", "a", "Zy", "é", "e\u0301", "ß", "ǅ",
               "1", "23", "456", "\u0661\u0662", "²", "Ⅻ", "!", "...", "?!\n", "_", "-", "$", "你", "好的", "。",
               "🙂", "👍🏽", "\u200b", "\x00"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(EDGE_PIECES), max_size=30).map("".join))
def test_ids_equal_tiktoken_on_pattern_edges(small_tok, small_enc, text):
    assert small_tok.encode(text) == small_enc.encode_ordinary(text)
    assert small_tok.decode(small_tok.encode(text)) == text


def test_custom_pattern_matches_tiktoken():
    gpt4 = PATTERN.replace(r"\p{N}{1,2}", r"\p{N}{1,3}")  # GPT-4's own pattern: not the default
    texts = [synthetic_text(7, 3000), SAMPLE]
    tok = train(texts, 400, pattern=gpt4)
    assert tok.get_pattern() == gpt4
    enc = to_tiktoken(tok)
    for text in texts + ["1234567 89", "x  \n\n y's"]:
        assert tok.encode(text) == enc.encode_ordinary(text), repr(text[:80])
    assert trained_merges(tok) == reference_bpe(texts, 400, pattern=gpt4)[0]


# ------------------------------------------------------------------ round trips
chinese = st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=50)
emoji = st.text(alphabet=st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), max_size=20)
controls = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x1F), max_size=20)
mixed = st.lists(st.one_of(st.text(max_size=40), chinese, emoji, controls), max_size=8).map("".join)


@settings(max_examples=300, deadline=None)
@given(mixed)
def test_decode_encode_roundtrip(small_tok, text):
    ids = small_tok.encode(text)
    assert small_tok.decode(ids) == text
    assert small_tok.decode_bytes(ids) == text.encode("utf-8")


@pytest.mark.parametrize("text", ["a\ud800b", "\udfff", "你\udc80好"])
def test_lone_surrogates_rejected(small_tok, text):
    with pytest.raises(Exception):  # a pyo3 panic is a BaseException and would escape this
        small_tok.encode(text)
    with pytest.raises(Exception):
        small_tok.batch_encode(["ok", text])
    assert small_tok.encode("still works") == to_tiktoken(small_tok).encode_ordinary("still works")


def test_decode_invalid_utf8_is_replaced(small_tok):
    # ids 0..255 are the raw bytes; "你" is E4 BD A0, so its first two bytes are a cut character
    assert small_tok.decode([0xE4, 0xBD]) == b"\xe4\xbd".decode("utf-8", errors="replace")  # as Python does
    assert small_tok.decode([ord("a"), 0xE4, ord("b")]) == "a\ufffdb"
    assert small_tok.decode([0xE4, 0xBD, 0xA0]) == "你"
    assert small_tok.decode_bytes([0xE4, 0xBD]) == b"\xe4\xbd"
    assert small_tok.token_bytes(ord("a")) == b"a"


def test_batch_encode_equals_encode(small_tok):
    texts = [SAMPLE, "", "hello", synthetic_text(5, 500), "你好" * 100] * 7
    assert small_tok.batch_encode(texts) == [small_tok.encode(t) for t in texts]
    assert small_tok.batch_encode([]) == []


def test_from_ranks_roundtrip(small_tok):
    again = rustbpe.Tokenizer.from_ranks(small_tok.get_mergeable_ranks(), small_tok.get_pattern())
    assert again.vocab_size == small_tok.vocab_size
    assert again.encode(SAMPLE) == small_tok.encode(SAMPLE)


# ------------------------------------------------------------------ determinism
def test_deterministic_across_runs_and_buffer_sizes():
    texts = [synthetic_text(seed, 5000) for seed in range(4)]
    a = train(texts, 500).get_mergeable_ranks()
    b = train(texts, 500).get_mergeable_ranks()
    c = train(texts, 500, buffer_size=1).get_mergeable_ranks()
    assert a == b == c


def test_deterministic_across_thread_counts():
    # the thread pool is sized once per process, so each count gets a fresh interpreter
    code = "import random, rustbpe\n" + inspect.getsource(synthetic_text) + (
        "t = rustbpe.Tokenizer()\n"
        "t.train_from_iterator(iter([synthetic_text(s, 5000) for s in range(4)]), 500, pattern=%r)\n"
        "print(sorted(t.get_mergeable_ranks(), key=lambda x: x[1]))\n" % PATTERN)
    outs = []
    for threads in ("1", "2", "3"):
        env = dict(os.environ, RAYON_NUM_THREADS=threads)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    assert len(outs[0]) > 1000 and outs[0] == outs[1] == outs[2]


# ------------------------------------------------------------------ errors are clean exceptions
def test_vocab_too_small():
    with pytest.raises(ValueError, match="256"):
        train(["hello"], 255)


def test_empty_corpus():
    with pytest.raises(ValueError):
        train([], 300)


def test_bad_regex():
    with pytest.raises(ValueError):
        train(["hello"], 300, pattern="(unclosed")


def test_non_string_item():
    with pytest.raises(TypeError):
        train(["hello", 42, "world"], 300)
    with pytest.raises(TypeError):
        train(["hello", b"bytes"], 300)


def test_iterator_error_propagates():
    def gen():
        yield "hello"
        raise RuntimeError("boom from the iterator")
    with pytest.raises(RuntimeError, match="boom"):
        train(gen(), 300)


def test_unknown_id_in_decode(small_tok):
    with pytest.raises(ValueError):
        small_tok.decode([small_tok.vocab_size + 1000])
    with pytest.raises((ValueError, OverflowError, TypeError)):
        small_tok.decode([-1])


# ------------------------------------------------------------------ special tokens
def test_special_tokens(small_tok):
    tok = rustbpe.Tokenizer.from_ranks(small_tok.get_mergeable_ranks(), small_tok.get_pattern())
    n = tok.vocab_size
    specials = {"<|bos|>": n, "<|user_start|>": n + 1, "<think>": n + 2}
    tok.set_special_tokens(specials)
    assert tok.get_special_tokens() == specials
    assert tok.vocab_size == n, "the shared interface: .vocab_size counts 256 bytes + merges, not specials"
    text = "<|bos|>hi <think>x</think><|user_start|>"
    with_special = tok.encode_with_special(text)
    assert with_special[0] == n and n + 1 == with_special[-1] and n + 2 in with_special
    assert tok.decode(with_special) == text
    plain = tok.encode(text)  # ordinary encoding: specials stay text
    assert all(i < n for i in plain)
    assert plain == to_tiktoken(tok).encode_ordinary(text)
    assert with_special == to_tiktoken(tok, specials).encode(text, allowed_special="all")
    assert tok.decode([n]) == "<|bos|>"
    assert tok.token_bytes(n) == b"<|bos|>"
