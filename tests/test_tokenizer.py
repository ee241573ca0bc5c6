"""
Tests of nanochat.tokenizer: a tiny tokenizer trained in-process on real shard text,
save/load, corrupt directories, render_conversation masks and errors.

    python -m pytest tests/test_tokenizer.py -q

Needs the offline corpus (`python -m nanochat.dataset` builds it). Never the network.
"""
import gzip
import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import nanochat.tokenizer as tokmod
from scripts import reference_tokenizers as refs
from nanochat.dataset import parquets_iter_batched
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer, TokenizerFormatError

VOCAB = 512
MIXED = "Hello world! It's 2025.\n\tdef f(x): return x ** 2\n你好，世界！今天天气很好。🙂 <|bos|> <think>"


def shard_texts(data_dir, n_chars, split="train"):
    texts, total = [], 0
    for batch in parquets_iter_batched(split=split, data_dir=data_dir):
        for doc in batch:
            texts.append(doc[:5000])
            total += len(texts[-1])
            if total >= n_chars:
                return texts
    return texts


@pytest.fixture(scope="module")
def tok(default_data_dir):
    texts = shard_texts(default_data_dir, 300_000)
    assert sum(map(len, texts)) >= 100_000, f"too little text in {default_data_dir}"
    return RustBPETokenizer.train_from_iterator(texts, VOCAB)


@pytest.fixture(scope="module")
def val_texts(default_data_dir):
    return shard_texts(default_data_dir, 200_000, split="val")


def sp(tok, name):
    return tok.encode_special(name)


# ------------------------------------------------------------------ vocabulary and encoding
def test_vocab_layout(tok):
    assert tok.get_vocab_size() == VOCAB
    n = VOCAB - len(SPECIAL_TOKENS)
    assert tok.get_special_tokens() == SPECIAL_TOKENS and SPECIAL_TOKENS[0] == "<|bos|>"
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(n, VOCAB))
    assert tok.get_bos_token_id() == n
    assert tok.id_to_token(n + 3) == "<|assistant_start|>"
    assert tok.id_to_token(ord("a")) == "a"
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")


def test_vocab_size_must_cover_specials():
    with pytest.raises(ValueError, match="vocab_size"):
        RustBPETokenizer.train_from_iterator(["hello world"], 256 + len(SPECIAL_TOKENS) - 1)


def test_encode_matches_tiktoken_and_round_trips(tok, val_texts):
    enc = tok.to_tiktoken()
    assert tok.encode(val_texts) == enc.encode_ordinary_batch(val_texts)
    for text in val_texts[:50] + [MIXED]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(MIXED)
    assert all(i < VOCAB - len(SPECIAL_TOKENS) for i in ids), "special-token text must stay plain"


def test_prepend_append(tok):
    bos, end = tok.get_bos_token_id(), sp(tok, "<|assistant_end|>")
    base = tok.encode("hi there")
    assert tok.encode("hi there", prepend="<|bos|>") == [bos] + base
    assert tok.encode("hi there", prepend=bos, append=end) == [bos] + base + [end]
    batch = tok.encode(["a", "hi there", ""], prepend="<|bos|>")
    assert batch == [[bos] + tok.encode("a"), [bos] + base, [bos]]
    with pytest.raises(ValueError):
        tok.encode("x", prepend="<|nope|>")
    with pytest.raises(ValueError):
        tok.encode("x", append=VOCAB)
    with pytest.raises(TypeError, match="item 1"):
        tok.encode(["ok", 3])


def test_decode_tensor_and_specials(tok):
    ids = tok.encode("hello", prepend="<|bos|>")
    assert tok.decode(torch.tensor(ids)) == "<|bos|>hello"
    with pytest.raises(ValueError):
        tok.decode([VOCAB + 5])


# ------------------------------------------------------------------ save / load
def test_save_load_round_trip(tok, val_texts, tmp_path):
    path = tmp_path / "tok"
    tok.save(str(path), metadata={"note": "test"})
    assert sorted(os.listdir(path)) == ["ranks.tiktoken", "token_bytes.pt", "tokenizer.json"]
    manifest = json.loads((path / "tokenizer.json").read_text())
    assert manifest["format"] == "nanochat-tokenizer" and manifest["version"] == 1
    assert manifest["metadata"] == {"note": "test"} and manifest["pattern"] == tok.get_pattern()
    first = (path / "ranks.tiktoken").read_text().splitlines()[ord("a")]
    assert first == "YQ== 97"  # tiktoken's format: base64 bytes, space, rank
    loaded = RustBPETokenizer.from_directory(str(path))
    assert loaded.encode(val_texts) == tok.encode(val_texts)
    assert loaded.encode(MIXED, prepend="<|bos|>") == tok.encode(MIXED, prepend="<|bos|>")
    assert loaded.get_mergeable_ranks() == tok.get_mergeable_ranks()
    token_bytes = torch.load(path / "token_bytes.pt", weights_only=True)
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (VOCAB,)
    expected = [len(b) for b, _ in tok.get_mergeable_ranks()] + [0] * len(SPECIAL_TOKENS)
    assert token_bytes.tolist() == expected
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "temp dir left behind"


def test_ranks_file_is_tiktoken_format(tok, tmp_path, monkeypatch):
    from tiktoken.load import load_tiktoken_bpe
    tok.save(str(tmp_path / "tok"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local file, cache nothing
    assert load_tiktoken_bpe(str(tmp_path / "tok" / "ranks.tiktoken")) == dict(tok.get_mergeable_ranks())


def test_save_over_existing_keeps_other_files(tok, tmp_path):
    path = tmp_path / "tok"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    (path / "tokenizer.json").write_text("old")
    tok.save(str(path))
    assert (path / "notes.txt").read_text() == "mine"
    assert RustBPETokenizer.from_directory(str(path)).encode(MIXED) == tok.encode(MIXED)


@pytest.fixture
def saved(tok, tmp_path):
    path = tmp_path / "tok"
    tok.save(str(path))
    return path


def test_missing_files_are_named(saved):
    os.remove(saved / "ranks.tiktoken")
    with pytest.raises(FileNotFoundError, match="ranks.tiktoken"):
        RustBPETokenizer.from_directory(str(saved))
    os.remove(saved / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        RustBPETokenizer.from_directory(str(saved))


def test_truncated_ranks_detected(saved):
    data = (saved / "ranks.tiktoken").read_bytes()
    (saved / "ranks.tiktoken").write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenizerFormatError, match="ranks.tiktoken.*sha256"):
        RustBPETokenizer.from_directory(str(saved))


def test_malformed_ranks_line_named(saved):
    lines = (saved / "ranks.tiktoken").read_text().splitlines()
    lines[299] = "not-base64!! 299"
    data = ("\n".join(lines) + "\n").encode()
    manifest = json.loads((saved / "tokenizer.json").read_text())
    manifest["ranks_sha256"] = hashlib.sha256(data).hexdigest()  # a consistent but bad edit
    (saved / "ranks.tiktoken").write_bytes(data)
    (saved / "tokenizer.json").write_text(json.dumps(manifest))
    with pytest.raises(TokenizerFormatError, match="ranks.tiktoken: line 300"):
        RustBPETokenizer.from_directory(str(saved))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("pattern"), "missing field 'pattern'"),
    (lambda m: m.update(version=99), "field 'version'"),
    (lambda m: m.update(format="other"), "field 'format'"),
    (lambda m: m.update(num_mergeable="x"), "field 'num_mergeable'"),
    (lambda m: m["special_tokens"].update({"<|bos|>": 0}), "field 'special_tokens'"),
    (lambda m: m.update(ranks_file="../x"), "field 'ranks_file'"),
    (lambda m: m.update(pattern="(unclosed"), "field 'pattern'"),
])
def test_bad_manifest_field_named(saved, edit, match):
    manifest = json.loads((saved / "tokenizer.json").read_text())
    edit(manifest)
    (saved / "tokenizer.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(TokenizerFormatError, match=match) as info:
        RustBPETokenizer.from_directory(str(saved))
    assert "tokenizer.json" in str(info.value)


def test_invalid_json_names_line(saved):
    text = (saved / "tokenizer.json").read_text().splitlines()
    text[3] = text[3] + " oops"
    (saved / "tokenizer.json").write_text("\n".join(text))
    with pytest.raises(TokenizerFormatError, match="tokenizer.json: line 4"):
        RustBPETokenizer.from_directory(str(saved))


def test_get_tokenizer_and_token_bytes(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tok_train"):
        tokmod.get_tokenizer()
    tok.save(str(tmp_path / "tokenizer"))
    assert tokmod.get_tokenizer().encode(MIXED) == tok.encode(MIXED)
    tb = tokmod.get_token_bytes()
    assert tb[tok.get_bos_token_id()] == 0 and tb[ord("a")] == 1 and len(tb) == VOCAB


# ------------------------------------------------------------------ render_conversation
def render_pieces(tok, ids, mask):
    """[(token text, mask)] for readable assertions."""
    return [(tok.id_to_token(i), m) for i, m in zip(ids, mask)]


def test_render_mask_covers_assistant_only(tok):
    conv = {"conversations": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
    ]}
    ids, mask = tok.render_conversation(conv)
    assert len(ids) == len(mask)
    expected = ([sp(tok, "<|bos|>"), sp(tok, "<|user_start|>")] + tok.encode("What is 2+2?")
                + [sp(tok, "<|user_end|>"), sp(tok, "<|assistant_start|>")] + tok.encode("It is 4.")
                + [sp(tok, "<|assistant_end|>"), sp(tok, "<|user_start|>")] + tok.encode("And 3+3?")
                + [sp(tok, "<|user_end|>"), sp(tok, "<|assistant_start|>")] + tok.encode("6.")
                + [sp(tok, "<|assistant_end|>")])
    assert ids == expected
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == tok.encode("It is 4.") + [sp(tok, "<|assistant_end|>")] + tok.encode("6.") \
        + [sp(tok, "<|assistant_end|>")]
    assert set(mask) == {0, 1}


def test_render_accepts_bare_list(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.render_conversation(msgs) == tok.render_conversation({"conversations": msgs})


def test_render_tool_parts(tok):
    conv = [{"role": "user", "content": "compute"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "python", "text": "print(6*7)"},
                {"type": "python_output", "text": "42"},
                {"type": "text", "text": "It is 42."}]}]
    ids, mask = tok.render_conversation(conv)
    pieces = render_pieces(tok, ids, mask)
    start = ids.index(sp(tok, "<|output_start|>"))
    end = ids.index(sp(tok, "<|output_end|>"))
    assert ids[start + 1:end] == tok.encode("42")
    assert all(m == 0 for m in mask[start:end + 1]), "tool output must not be trained on"
    py = ids.index(sp(tok, "<|python_start|>"))
    py_end = ids.index(sp(tok, "<|python_end|>"))
    assert ids[py + 1:py_end] == tok.encode("print(6*7)") and all(mask[py:py_end + 1])
    assert pieces[-1] == ("<|assistant_end|>", 1)
    assert ids[end + 1:-1] == tok.encode("It is 42.") and all(mask[end + 1:])


def test_render_system_folded(tok):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    ids, mask = tok.render_conversation(conv)
    folded = tok.render_conversation([{"role": "user", "content": "Be brief.\n\nHi"},
                                      {"role": "assistant", "content": "Hello"}])
    assert (ids, mask) == folded


def test_render_think_tokens(tok):
    conv = [{"role": "user", "content": "q <think>"},
            {"role": "assistant", "content": "<think>reason</think>answer <|assistant_end|>"}]
    ids, mask = tok.render_conversation(conv)
    think, unthink = sp(tok, "<think>"), sp(tok, "</think>")
    a = ids.index(sp(tok, "<|assistant_start|>"))
    assert ids[a + 1] == think and mask[a + 1] == 1
    assert ids[a + 2:ids.index(unthink)] == tok.encode("reason")
    # only the think tags are special in assistant text; the user's "<think>" is plain text
    assert ids.count(think) == 1 and ids.count(sp(tok, "<|assistant_end|>")) == 1
    assert ids[ids.index(unthink) + 1:-1] == tok.encode("answer <|assistant_end|>")


def test_user_text_never_produces_specials(tok):
    nasty = "".join(SPECIAL_TOKENS) + " <|assistant_end|> hi"
    ids, mask = tok.render_conversation([{"role": "user", "content": nasty},
                                         {"role": "assistant", "content": "ok"}])
    u0, u1 = ids.index(sp(tok, "<|user_start|>")), ids.index(sp(tok, "<|user_end|>"))
    assert ids[u0 + 1:u1] == tok.encode(nasty)
    assert all(i < tok.get_bos_token_id() for i in ids[u0 + 1:u1])
    assert ids.count(sp(tok, "<|assistant_end|>")) == 1


@pytest.mark.parametrize("messages, match", [
    ([{"role": "assistant", "content": "x"}], "message 0"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "assistant", "content": "c"}], "message 2"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "message 1: unknown role"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}], "message 1"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "message 1"),
    ([{"role": "user"}], "message 0"),
    ([{"role": "user", "content": 3}], "message 0"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "message 1, part 0"),
    ([], "non-empty"),
])
def test_render_errors_name_the_message(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"conversations": messages})


def test_render_truncation(tok):
    conv = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "reply " * 200}]
    full_ids, full_mask = tok.render_conversation(conv, max_tokens=10**6)
    ids, mask = tok.render_conversation(conv, max_tokens=50)
    assert len(full_ids) > 50 and ids == full_ids[:50] and mask == full_mask[:50]


def test_render_for_completion(tok):
    conv = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    ids = tok.render_for_completion(conv)
    assert ids[-1] == sp(tok, "<|assistant_start|>")
    assert ids == [sp(tok, "<|bos|>"), sp(tok, "<|user_start|>")] + tok.encode("Hi") \
        + [sp(tok, "<|user_end|>"), sp(tok, "<|assistant_start|>")]
    assert tok.render_for_completion(conv["conversations"][:1]) == ids  # ending on the user turn


# ------------------------------------------------------------------ reference encodings (offline)
def test_reference_encoding_unavailable_names_reason():
    enc, reason = refs.reference_encoding("gpt2")
    assert enc is None and "not available offline" in reason


def test_reference_encoding_rejects_wrong_hash(tmp_path, monkeypatch):
    """The .tiktoken file from the archive must match tiktoken's expected sha256."""
    archive = tmp_path / "fake.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("bpe_openai/data/cl100k_base.tiktoken.gz", gzip.compress(b"YQ== 0\n"))
    monkeypatch.setattr(refs, "fetch_package_archive", lambda *a, **k: str(archive))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    enc, reason = refs.reference_encoding("cl100k_base")
    assert enc is None and "sha256" in reason
    assert os.listdir(tmp_path / "cache") == []


# ------------------------------------------------------------------ the scripts, end to end
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def script_base(tmp_path_factory, default_data_dir):
    """A base dir whose base_data holds a few hundred KB of the real corpus."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    base = tmp_path_factory.mktemp("base")
    (base / "base_data").mkdir()
    for split, n_chars in [("train", 400_000), ("val", 100_000)]:
        texts = shard_texts(default_data_dir, n_chars, split=split)
        table = pa.table({"text": texts, "source": ["test"] * len(texts)})
        pq.write_table(table, base / "base_data" / f"{split}_00000.parquet", row_group_size=64)
    return base


def run_script(args, base):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base))
    env.pop("TIKTOKEN_CACHE_DIR", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_tok_train_and_eval_scripts(script_base):
    out = run_script(["-m", "scripts.tok_train", "--vocab_size=400", "--max_chars=200000", "--doc_cap=2000"],
                     script_base)
    assert out.returncode == 0, out.stderr
    assert "round trip ok" in out.stdout
    tok = RustBPETokenizer.from_directory(str(script_base / "tokenizer"))
    assert tok.get_vocab_size() == 400
    meta = json.loads((script_base / "tokenizer" / "tokenizer.json").read_text())["metadata"]
    assert meta["doc_cap"] == 2000 and 200_000 <= meta["train_chars"] < 202_000
    out = run_script(["-m", "scripts.tok_eval", "--references=False", "--sample_chars=20000"], script_base)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
            if line.startswith(("English ", "Chinese ", "code "))}
    assert set(rows) == {"English", "Chinese", "code"}
    assert "GPT-2 r50k: not available offline" in out.stdout
    ours_ratio = float(rows["English"][2])
    assert 1.5 < ours_ratio < 6, out.stdout  # bytes/token of a 400-token vocab on English


def test_tok_eval_on_a_corpus_of_one_language(tmp_path):
    """A user's corpus may hold no Chinese at all: tok_eval says so and leaves the row out."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = [f"An English document, number {i}, about rivers and stones." for i in range(200)]
    (tmp_path / "base_data").mkdir()
    for split in ("train", "val"):
        pq.write_table(pa.table({"text": texts, "source": ["mine.jsonl"] * len(texts)}),
                       tmp_path / "base_data" / f"{split}_00000.parquet")
    RustBPETokenizer.train_from_iterator(texts, 300).save(str(tmp_path / "tokenizer"))
    out = run_script(["-m", "scripts.tok_eval", "--references=False", "--sample_chars=2000"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "no Chinese document in the val split" in out.stdout and not any(
        line.startswith("Chinese ") for line in out.stdout.splitlines())


def test_tok_train_runs_as_file_and_rejects_unknown_keys(script_base, tmp_path):
    out = run_script(["scripts/tok_train.py", "--vocab_size=300", "--max_chars=20000",
                      f"--output_dir={tmp_path / 'tok'}"], script_base)
    assert out.returncode == 0, out.stderr
    assert RustBPETokenizer.from_directory(str(tmp_path / "tok")).get_vocab_size() == 300
    out = run_script(["-m", "scripts.tok_train", "--vocab_sise=300"], script_base)
    assert out.returncode == 2 and "vocab_size" in out.stderr


def test_reference_encoding_cl100k_offline(tmp_path, monkeypatch):
    """From the cached bpe-openai wheel to a working tiktoken cl100k_base, without the network."""
    import nanochat.package_data
    cache = os.path.join(tokmod.get_base_dir(), "package_cache")
    wheels = [f for f in os.listdir(cache) if f.startswith("bpe_openai-0.1.4")] if os.path.isdir(cache) else []
    if not wheels:
        pytest.skip(f"bpe-openai 0.1.4 not in {cache} (python -m scripts.tok_eval fetches it once)")
    real_fetch = nanochat.package_data.fetch_package_archive

    def offline_fetch(*args, **kwargs):  # the cached archive only; a download would be a test bug
        monkeypatch.setattr(nanochat.package_data.subprocess, "run", None)
        return real_fetch(*args, **kwargs)
    monkeypatch.setattr(refs, "fetch_package_archive", offline_fetch)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    import tiktoken.registry
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # no encoding loaded earlier in this process
    enc, reason = refs.reference_encoding("cl100k_base")
    assert reason is None, reason
    assert enc.encode("hello world") == [15339, 1917]  # GPT-4's well-known ids
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    assert os.listdir(tmp_path) == [hashlib.sha1(url.encode()).hexdigest()]
