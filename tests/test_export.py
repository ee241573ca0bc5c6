"""
Export to (and import from) Hugging Face transformers, checked against transformers itself:
logits, tokenizer ids, chat template and greedy generation of the exported model equal ours;
the conventions behind them (rotary, RMSNorm eps, QK-norm order) measured one by one; the CLI's
round trip is bit-exact and its bad inputs are one-line errors that leave nothing behind.
Run: nice -n 10 python -m pytest tests/test_export.py -q   (tiny models; transformers, safetensors)
"""
import itertools
import json
import os
import runpy
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import transformers  # a dev dependency (with safetensors): missing, these tests fail rather than skip

from nanochat import hf_export
from nanochat.checkpoint_manager import build_model, model_path, resolve_checkpoint, save_checkpoint
from nanochat.dataset import parquets_iter_batched
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig, apply_rotary_emb, norm
from nanochat.tokenizer import SPLIT_PATTERN, RustBPETokenizer, tokenizer_fingerprint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = 'def area(r):\n    """Circle area."""\n    return 3.14159 * r ** 2  # 面积\n\nprint(area(2.5), [x*x for x in range(10)])\n'
CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Let me add. "},
                                                  {"type": "python", "text": "12 + 30"},
                                                  {"type": "python_output", "text": "42"},
                                                  {"type": "text", "text": "<think>easy</think>It is 42."}]},
                {"role": "user", "content": "谢谢！And in words?"},
                {"role": "assistant", "content": "Forty-two."},
                {"role": "user", "content": "Thanks.\n\n  Bye"}]


@pytest.fixture(scope="module")
def corpus(default_data_dir):
    """The first 1200 training documents (400 train the tokenizer, the rest are held out)."""
    documents = (t[:2000] for batch in parquets_iter_batched("train", data_dir=default_data_dir) for t in batch)
    return list(itertools.islice(documents, 1200))


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return RustBPETokenizer.train_from_iterator(corpus[:400], 1024)


@pytest.fixture(scope="module")
def held_out(corpus):
    """Documents the tokenizer never saw, English and Chinese."""
    english = [t for t in corpus[800:] if t.isascii()][:40]
    chinese = [t for t in corpus[800:] if sum("\u4e00" <= ch <= "\u9fff" for ch in t) > len(t) // 4][:40]
    assert len(english) >= 10 and len(chinese) >= 10, "the corpus should hold English and Chinese documents"
    return english, chinese


def tiny_model(vocab_size, seed=0, **overrides):
    """Depth 2 with GQA, output projections and lm_head randomized (init zeroes them, which would
    hide attention and MLP differences), the special tokens' logits pinned at 0 so greedy decoding
    neither stops nor calls a tool within 64 tokens."""
    kw = dict(sequence_len=128, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=128)
    with torch.device("meta"):
        model = GPT(GPTConfig(**{**kw, **overrides}))
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * 0.5)
        model.lm_head.weight[vocab_size - 11:] = 0  # the 11 special tokens
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer.get_vocab_size())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, model, tokenizer):
    directory = tmp_path_factory.mktemp("hf")
    card = hf_export.model_card("tiny", "chatsft", model, "test", "python -m scripts.export ...", [("val_bpb", 1.5)])
    hf_export.save_hf_dir(str(directory), model, tokenizer, "float32", card)
    return str(directory)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


# ----------------------------------------------------------------------------- the conventions, measured

def test_rms_norm_eps_is_float32_epsilon():
    """Our norm adds torch.finfo(float32).eps; transformers' default 1e-6 is visibly different on
    small activations, the exported value is not."""
    from transformers.models.nanochat.modeling_nanochat import NanoChatRMSNorm
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 1e-3  # mean square ~1e-6
    ours = norm(x)
    assert torch.allclose(NanoChatRMSNorm(eps=hf_export.RMS_NORM_EPS)(x), ours, rtol=1e-5, atol=1e-6)
    assert (NanoChatRMSNorm(eps=1e-6)(x) - ours).abs().max() > 0.1
    xb = x.bfloat16()  # bf16 input: still the fp32 eps (bf16's, 0.0078, would shrink the output ~100x)
    assert torch.allclose(norm(xb).float(), norm(xb.float()), rtol=1e-2, atol=1e-2)


def test_rotary_and_qk_norm_order_match(model):
    """transformers' NanoChat rotation (x*cos + (x2, -x1)*sin) is ours; QK-norm after rotary in both,
    and since rotary preserves each pair's length the order would not matter anyway."""
    from transformers.models.nanochat.modeling_nanochat import NanoChatRotaryEmbedding, apply_rotary_pos_emb
    cfg = transformers.NanoChatConfig(**hf_export.hf_config(model.config, _Specials(), "float32"))
    B, T, H, D = 2, 50, model.config.n_head, model.config.n_embd // model.config.n_head
    q = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(0))
    cos, sin = NanoChatRotaryEmbedding(cfg)(q, torch.arange(T)[None])
    theirs, _ = apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), cos, sin)
    ours = apply_rotary_emb(q, model.cos[:, :T], model.sin[:, :T])
    assert (ours.transpose(1, 2) - theirs).abs().max() < 1e-5
    assert torch.allclose(norm(apply_rotary_emb(q, model.cos[:, :T], model.sin[:, :T])),
                          apply_rotary_emb(norm(q), model.cos[:, :T], model.sin[:, :T]), atol=1e-5)


class _Specials:
    """Stands in for a tokenizer where only the special-token ids matter."""

    def encode_special(self, name):
        return 1000 + ["<|bos|>", "<|assistant_end|>"].index(name)

    def get_bos_token_id(self):
        return 1000


# ----------------------------------------------------------------------------- the exported model

@pytest.mark.parametrize("which", ["english", "chinese", "code", "chat"])
def test_logits_equal_ours(which, model, hf_model, tokenizer, held_out):
    if which == "chat":  # special tokens included (pad = <|assistant_end|> must not be masked)
        ids = tokenizer.render_conversation(CONVERSATION)[0]
    else:
        text = {"english": held_out[0][0], "chinese": held_out[1][0], "code": CODE}[which]
        ids = tokenizer.encode(text, prepend="<|bos|>")
    x = torch.tensor([ids[:128]])
    with torch.no_grad():
        ours, theirs = model(x), hf_model(x).logits
    assert ours.shape == theirs.shape and x.size(1) > 30
    assert (ours - theirs).abs().max().item() < 1e-4


def test_tokenizer_ids_equal_ours(tokenizer, hf_tok, held_out):
    english, chinese = held_out
    for text in english + chinese + [CODE, "  spaces\t\ttabs\r\n\n\nnewlines  ", "it's 1234567 don't", "emoji 😀👍🏽"]:
        ids = tokenizer.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, text[:60]
        assert hf_tok(text)["input_ids"] == [tokenizer.get_bos_token_id()] + ids  # <|bos|> first, as a document
        assert hf_tok.decode(ids) == tokenizer.decode(ids) == text
    sp = tokenizer.encode_special
    for name in tokenizer.get_special_tokens():
        assert hf_tok.convert_tokens_to_ids(name) == sp(name)
    text = "<|user_start|>hi there<|user_end|><|assistant_start|>你好<think>"  # special tokens as written in text
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == \
        [sp("<|user_start|>")] + tokenizer.encode("hi there") + [sp("<|user_end|>"), sp("<|assistant_start|>")] + \
        tokenizer.encode("你好") + [sp("<think>")]
    assert hf_tok.decode(tokenizer.encode("hi", prepend="<|bos|>"), skip_special_tokens=True) == "hi"


def test_chat_template_equals_render(tokenizer, hf_tok):
    for n in (2, 4, 6):  # system + user, ..., three user turns; each ends with a user message
        conversation = CONVERSATION[:n]
        prompt = hf_tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert prompt["input_ids"] == tokenizer.render_for_completion(conversation)
    full = CONVERSATION[:5]  # ends with the assistant: the whole rendered conversation
    assert hf_tok.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"] == \
        tokenizer.render_conversation(full)[0]
    no_system = CONVERSATION[1:4]
    assert hf_tok.apply_chat_template(no_system, add_generation_prompt=True, return_dict=True)["input_ids"] == \
        tokenizer.render_for_completion(no_system)
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template([{"role": "assistant", "content": "hi"}], tokenize=False)


def test_greedy_generation_equals_engine(model, hf_model, tokenizer, hf_tok):
    conversation = CONVERSATION[:4]
    prompt = tokenizer.render_for_completion(conversation)
    ours, masks = Engine(model, tokenizer).generate_batch(prompt, max_tokens=64, temperature=0.0)
    assert len(ours[0]) == 64 and all(masks[0])  # no stop, no tool call: 64 sampled tokens
    inputs = hf_tok.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=64, do_sample=False)
    assert out[0, len(prompt):].tolist() == ours[0]


def test_directory_files(hf_dir, tokenizer):
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(hf_dir, "generation_config.json")) as f:
        generation = json.load(f)
    with open(os.path.join(hf_dir, "tokenizer_config.json")) as f:
        tok_config = json.load(f)
    sp = tokenizer.encode_special
    assert config["model_type"] == "nanochat" and config["architectures"] == ["NanoChatForCausalLM"]
    assert config["rms_norm_eps"] == torch.finfo(torch.float32).eps and config["final_logit_softcapping"] == 15.0
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert generation["eos_token_id"] == [sp("<|assistant_end|>"), sp("<|bos|>")]  # the Engine's stop tokens
    assert tok_config["chat_template"] == hf_export.CHAT_TEMPLATE and tok_config["eos_token"] == "<|assistant_end|>"
    with open(os.path.join(hf_dir, "README.md")) as f:
        card = f.read()
    assert 'AutoModelForCausalLM.from_pretrained("tiny")' in card and "| val_bpb | 1.5000 |" in card
    assert sorted(os.listdir(hf_dir)) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                          "tokenizer.json", "tokenizer_config.json"]


def test_bfloat16_export_loads(tmp_path, model, tokenizer):
    hf_export.save_hf_dir(str(tmp_path), model, tokenizer, "bfloat16")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.bfloat16())


def test_merges_are_the_ranks_bpe(tokenizer):
    """Each merge joins two lower-rank tokens into the token of the next rank."""
    ranks = dict(tokenizer.get_mergeable_ranks())
    for rank, (a, b) in enumerate(hf_export.bpe_merges(ranks.items()), start=256):
        assert ranks[a + b] == rank and ranks[a] < rank and ranks[b] < rank
    with pytest.raises(hf_export.ExportError, match="not the merge of two lower-rank tokens"):
        hf_export.bpe_merges([(bytes([i]), i) for i in range(256)] + [(b"abc", 256)])


# ----------------------------------------------------------------------------- the script

def run_export(base_dir, *args, monkeypatch):
    """scripts/export.py in this process (no second torch import); returns its SystemExit message or None."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setattr(sys, "argv", ["scripts/export.py", *args])
    try:
        runpy.run_module("scripts.export", run_name="__main__")
    except SystemExit as e:
        return str(e.code)
    return None


@pytest.fixture
def base_dir(tmp_path, model, tokenizer):
    """A base dir with the tokenizer and the model as chatsft_checkpoints/t1 step 5."""
    base = tmp_path / "base"
    tokenizer.save(str(base / "tokenizer"))
    save_checkpoint(str(base / "chatsft_checkpoints" / "t1"), 5, model.state_dict(), None,
                    {"model_config": asdict(model.config), "tokenizer_hash": tokenizer_fingerprint(tokenizer),
                     "val_loss": 2.25})
    return base


def test_round_trip_is_bit_exact(tmp_path, base_dir, model, tokenizer, monkeypatch):
    out = tmp_path / "hf_t1"
    assert run_export(base_dir, "--checkpoint=chatsft_checkpoints/t1", f"--out={out}", monkeypatch=monkeypatch) is None
    assert "| val_loss | 2.2500 |" in (out / "README.md").read_text()
    other = tmp_path / "other"
    assert run_export(other, f"--from_hf={out}", "--stage=base", "--model_tag=back", monkeypatch=monkeypatch) is None
    back, meta = build_model(*resolve_checkpoint("base_checkpoints/back"), "cpu")
    original = model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in back.state_dict().items())
    restored = RustBPETokenizer.from_directory(str(other / "tokenizer"))
    assert tokenizer_fingerprint(restored) == tokenizer_fingerprint(tokenizer) == meta["tokenizer_hash"]
    # a second import under the same tag, or over another tokenizer, needs --force
    assert "already has checkpoints" in run_export(other, f"--from_hf={out}", "--stage=base", "--model_tag=back",
                                                   monkeypatch=monkeypatch)
    RustBPETokenizer.from_ranks([(bytes([i]), i) for i in range(256)]).save(str(other / "tokenizer"))
    assert "holds a different tokenizer" in run_export(other, f"--from_hf={out}", "--model_tag=x",
                                                       monkeypatch=monkeypatch)


def test_bad_inputs_are_one_line_errors(tmp_path, base_dir, tokenizer, monkeypatch):
    out = tmp_path / "out"
    err = run_export(base_dir, "--checkpoint=chatsft_checkpoints/nope", f"--out={out}", monkeypatch=monkeypatch)
    assert "no checkpoint matches" in err and "\n" not in err
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = run_export(base_dir, "--checkpoint=chatsft_checkpoints/t1", f"--out={out}", monkeypatch=monkeypatch)
    assert "not an empty directory" in err and (out / "keep.txt").exists()
    assert run_export(base_dir, "--checkpoint=chatsft_checkpoints/t1", f"--out={out}", "--force",
                      monkeypatch=monkeypatch) is None
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    # another architecture
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    err = run_export(tmp_path / "b2", f"--from_hf={llama}", monkeypatch=monkeypatch)
    assert "model_type 'llama' is not 'nanochat'" in err and "\n" not in err
    assert not (tmp_path / "b2" / "chatsft_checkpoints").exists() and not (tmp_path / "b2" / "tokenizer").exists()
    # a mixture-of-experts checkpoint
    moe = tiny_model(tokenizer.get_vocab_size(), n_experts=4)
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "moe"), 1, moe.state_dict(), None,
                    {"model_config": asdict(moe.config)})
    err = run_export(base_dir, "--checkpoint=chatsft_checkpoints/moe", f"--out={tmp_path / 'moe'}",
                     monkeypatch=monkeypatch)
    assert "mixture-of-experts" in err and "no standard architecture" in err
    assert [n for n in os.listdir(tmp_path) if n.startswith(".") or n == "moe"] == []  # no output, no temp dir


def test_corrupt_checkpoint_cli(tmp_path, base_dir):
    """As a user runs it: exit status 1 and one line on stderr naming the file."""
    path = model_path(str(base_dir / "chatsft_checkpoints" / "t1"), 5)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    proc = subprocess.run([sys.executable, "-m", "scripts.export", "--checkpoint=chatsft_checkpoints/t1",
                           f"--out={tmp_path / 'hf'}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "corrupt" in proc.stderr and path in proc.stderr
    assert not (tmp_path / "hf").exists()


def test_pattern_that_oniguruma_reads_differently_is_refused():
    """tiktoken's cl100k pattern has \\p{N}{1,3}+ (possessive); Oniguruma reads {1,3}+ as "one or more
    runs of 1-3 digits", so "1916" is one piece there and two here: the export refuses."""
    pattern = SPLIT_PATTERN.replace(r"\p{N}{1,2}", r"\p{N}{1,3}+")
    numbers = [" ".join(str(n) for n in range(1000, 3000, 7))] * 5
    other = RustBPETokenizer.train_from_iterator(numbers, 400, pattern=pattern)
    with pytest.raises(hf_export.ExportError, match="Oniguruma"):
        hf_export.hf_tokenizer(other)


def test_import_refuses_tokenizers_it_cannot_reproduce(hf_dir, tmp_path):
    import shutil
    with open(os.path.join(hf_dir, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)

    def tampered(edit):
        directory = tmp_path / f"t{len(os.listdir(tmp_path))}"
        shutil.copytree(hf_dir, directory)
        changed = json.loads(json.dumps(spec))
        edit(changed)
        (directory / "tokenizer.json").write_text(json.dumps(changed), encoding="utf-8")
        return str(directory)

    assert hf_export.tokenizer_from_hf(tampered(lambda s: None)).get_vocab_size() == 1024
    with pytest.raises(hf_export.ExportError, match="special tokens"):
        hf_export.tokenizer_from_hf(tampered(lambda s: s["added_tokens"].pop()))
    with pytest.raises(hf_export.ExportError, match="merge 3 is not the one"):
        hf_export.tokenizer_from_hf(tampered(lambda s: s["model"]["merges"].insert(3, s["model"]["merges"].pop(40))))
    with pytest.raises(hf_export.ExportError, match="not a regex Split then ByteLevel"):
        hf_export.tokenizer_from_hf(tampered(lambda s: s.update(pre_tokenizer={"type": "Whitespace"})))


def test_lora_adapter_is_merged_first(tmp_path, base_dir, model, monkeypatch):
    from safetensors.torch import load_file

    from nanochat import lora
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    adapted, meta = build_model(*resolve_checkpoint("chatsft_checkpoints/t1"), "cpu")
    lora.apply_lora(adapted, rank=2, alpha=4.0, targets="attn.c_q,mlp.c_fc")
    with torch.no_grad():
        for p in lora.lora_parameters(adapted):
            p.normal_()
    path = str(tmp_path / "adapter.pt")
    lora.save_adapter(path, adapted, meta)
    merged = lora.merged_state_dict(adapted)
    out = tmp_path / "hf"
    assert run_export(base_dir, "--checkpoint=chatsft_checkpoints/t1", f"--adapter={path}", f"--out={out}",
                      monkeypatch=monkeypatch) is None
    tensors = load_file(str(out / "model.safetensors"))
    assert torch.equal(tensors["model.layers.1.self_attn.q_proj.weight"], merged["transformer.h.1.attn.c_q.weight"])
    assert not torch.equal(merged["transformer.h.1.attn.c_q.weight"], model.state_dict()["transformer.h.1.attn.c_q.weight"])
    assert "LoRA adapter" in (out / "README.md").read_text()


def test_import_of_another_eps_says_so(tmp_path, hf_dir, monkeypatch, capsys):
    import shutil
    directory = tmp_path / "hub_style"
    shutil.copytree(hf_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(rms_norm_eps=1e-6, rope_theta=10000.0)
    del config["rope_parameters"]  # a transformers 4.x style config
    (directory / "config.json").write_text(json.dumps(config))
    assert run_export(tmp_path / "b", f"--from_hf={directory}", monkeypatch=monkeypatch) is None
    assert "rms_norm_eps=1e-06" in capsys.readouterr().out
    assert resolve_checkpoint("chatsft_checkpoints/hub_style")[1] == 0


def test_verify_flag_reports_equality(tmp_path, base_dir, monkeypatch, capsys):
    """--verify: transformers loads the export and it matches (the base dir has no corpus: probe texts)."""
    assert run_export(base_dir, "--checkpoint=chatsft_checkpoints/t1", f"--out={tmp_path / 'hf'}", "--verify",
                      monkeypatch=monkeypatch) is None
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("verify:"))
    assert "tokenizer ids equal on 7/7" in line and "chat template equal" in line
    assert "greedy: 64 tokens agree (ours 64, transformers 64)" in line
