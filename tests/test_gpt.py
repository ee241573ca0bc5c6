"""Tests for nanochat/gpt.py: shapes, losses, KV-cached decoding, GQA, init, FLOPs, overfitting.

Run: python -m pytest tests/test_gpt.py -q   (CPU, tiny models, a few seconds)
"""
import math

import pytest
import torch
import torch.nn.functional as F

import nanochat.gpt as gpt_module
from nanochat.adamw import AdamW
from nanochat.gpt import GPT, GPTConfig, KVCache, config_from_depth
from nanochat.muon import Muon

VOCAB = 97


def make_model(seed=0, **overrides):
    kw = dict(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=4, n_embd=64)
    kw.update(overrides)
    config = GPTConfig(**kw)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


def randomize_outputs(model, seed=1):
    # init zeroes the output projections (every block is the identity at first), which would
    # make cache bugs in attention invisible; give them weights for the comparisons.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.transformer.h:
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * 0.1)
    return model


def new_cache(model, batch_size, seq_len=8):
    c = model.config
    return KVCache(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer)


def test_config_from_depth():
    for depth in range(1, 25):
        c = config_from_depth(depth, vocab_size=VOCAB, sequence_len=32)
        head_dim = c.n_embd // c.n_head
        assert c.n_embd == 64 * depth and c.n_layer == depth and c.n_kv_head == c.n_head
        assert c.n_embd % c.n_head == 0 and head_dim % 2 == 0 and head_dim <= 128
    assert config_from_depth(20, VOCAB, 32).n_head == 10  # d20: 1280 wide, 10 heads of 128
    assert config_from_depth(1, VOCAB, 32).n_head == 1  # tiny: one head of 64
    assert config_from_depth(4, VOCAB, 32, head_dim=64, n_kv_head=2).n_kv_head == 2
    with pytest.raises(AssertionError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3, n_embd=64)


def test_forward_shapes_and_initial_loss():
    model = make_model()
    idx = torch.randint(0, VOCAB, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, VOCAB) and logits.dtype == torch.float32
    assert logits.abs().max() < model.config.softcap  # soft-capped
    loss = model(idx, targets=idx)
    assert loss.ndim == 0 and abs(loss.item() - math.log(VOCAB)) < 0.05


def test_logits_at_picks_one_position_per_row():
    model = make_model()
    with torch.no_grad():  # the zero-initialised lm_head would make every row equal
        model.lm_head.weight.normal_(0, 0.5)
    idx = torch.randint(0, VOCAB, (3, 16))
    positions = torch.tensor([15, 0, 7])
    full, picked = model(idx), model(idx, logits_at=positions)
    assert picked.shape == (3, 1, VOCAB)
    torch.testing.assert_close(picked[:, 0], full[torch.arange(3), positions], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(picked[0, 0], picked[1, 0])


def test_softcap_bounds_large_logits():
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)
    logits = model(torch.randint(0, VOCAB, (1, 8)))
    assert logits.abs().max() <= model.config.softcap + 1e-4
    assert logits.abs().max() > 0.9 * model.config.softcap


def test_loss_reductions_agree():
    model = randomize_outputs(make_model())
    idx = torch.randint(0, VOCAB, (2, 16))
    targets = torch.randint(0, VOCAB, (2, 16))
    targets[0, :5] = -1  # ignored positions
    n = (targets != -1).sum()
    mean = model(idx, targets)
    total = model(idx, targets, loss_reduction="sum")
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 16)
    assert torch.all(per_token[0, :5] == 0)
    torch.testing.assert_close(mean, total / n)
    torch.testing.assert_close(per_token.sum(), total)
    # per-token loss is -log softmax(logits)[target]
    logp = torch.log_softmax(model(idx), dim=-1)
    expected = -logp[1].gather(-1, targets[1][:, None]).squeeze(-1)
    torch.testing.assert_close(per_token[1], expected)
    with pytest.raises(AssertionError, match="loss_reduction"):
        model(idx, targets, loss_reduction="avg")


@pytest.mark.parametrize("chunk_tokens", [3, 0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cpu_loss_matches_plain_loss_and_grads(reduction, chunk_tokens, monkeypatch):
    # On CPU the loss takes ChunkedSoftcapCrossEntropy; it must give the plain path's loss
    # and gradients. Tiny chunks (3 tokens) so that chunk edges are exercised; 0 = chunking off.
    monkeypatch.setattr(gpt_module, "LOSS_CHUNK_ELEMENTS", chunk_tokens * VOCAB)
    model = randomize_outputs(make_model())
    idx = torch.randint(0, VOCAB, (2, 16))
    targets = torch.randint(0, VOCAB, (2, 16))
    targets[1, 3:9] = -1
    weights = torch.rand(2, 16)  # for "none": an arbitrary per-token weighting

    def run(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        (loss * weights).sum().backward() if reduction == "none" else loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    def plain():  # logits from the plain path (targets=None), loss by F.cross_entropy
        logits = model(idx)
        loss = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-1, reduction=reduction)
        return loss.view(2, 16) if reduction == "none" else loss

    loss_ref, grads_ref = run(plain)
    loss, grads = run(lambda: model(idx, targets, loss_reduction=reduction))
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # eval: no gradient work, same loss
        torch.testing.assert_close(model(idx, targets, loss_reduction=reduction), loss_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_matches_full_forward(n_kv_head):
    model = randomize_outputs(make_model(n_kv_head=n_kv_head)).eval()
    idx = torch.randint(0, VOCAB, (2, 20))
    full = model(idx)
    cache = new_cache(model, batch_size=2, seq_len=4)  # small on purpose: must grow
    with torch.no_grad():
        parts = [model(idx[:, :9], kv_cache=cache)]  # prefill
        for t in range(9, 14):  # single-token steps
            parts.append(model(idx[:, t:t + 1], kv_cache=cache))
        parts.append(model(idx[:, 14:20], kv_cache=cache))  # several tokens after a cache
    assert cache.get_pos() == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)
    cache.reset()
    assert cache.get_pos() == 0
    with torch.no_grad():
        torch.testing.assert_close(model(idx[:, :5], kv_cache=cache), full[:, :5], atol=1e-4, rtol=1e-4)


def test_kv_cache_prefill_copy_to_batch():
    model = randomize_outputs(make_model(n_kv_head=2)).eval()
    prompt = torch.randint(0, VOCAB, (1, 7))
    one = new_cache(model, batch_size=1)
    with torch.no_grad():
        model(prompt, kv_cache=one)
        many = new_cache(model, batch_size=3, seq_len=4)
        many.prefill(one)
        assert many.get_pos() == 7
        nxt = torch.randint(0, VOCAB, (3, 1))
        got = model(nxt, kv_cache=many)[:, -1]
        expected = model(torch.cat([prompt.expand(3, -1), nxt], dim=1))[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_gqa_has_fewer_kv_params_and_trains():
    full, gqa = make_model(), randomize_outputs(make_model(n_kv_head=1))
    assert gqa.num_params() < full.num_params()
    assert gqa.transformer.h[0].attn.c_k.weight.shape == (16, 64)  # one kv head of 16
    idx = torch.randint(0, VOCAB, (2, 16))
    loss = gqa(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and gqa.transformer.h[0].attn.c_k.weight.grad.abs().sum() > 0


def test_meta_init_is_finite_and_seeded():
    a, b, c = make_model(seed=3), make_model(seed=3), make_model(seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert pa.device.type == "cpu" and torch.isfinite(pa).all(), name
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)
    assert a.cos.shape[1] == 10 * a.config.sequence_len and torch.isfinite(a.cos).all()
    assert "cos" not in a.state_dict()  # rotary tables are recomputed, never saved


def test_estimate_flops():
    flops = [make_model(n_layer=d).estimate_flops() for d in (1, 2, 4)]
    assert all(f > 0 for f in flops) and flops[0] < flops[1] < flops[2]
    m = make_model()
    c = m.config
    dense = 6 * (m.num_params() - c.vocab_size * c.n_embd)
    assert m.estimate_flops() == dense + 12 * c.n_layer * c.n_embd * c.sequence_len


def test_setup_optimizers_groups():
    model = make_model(n_embd=128, n_head=2, n_kv_head=2)
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02)
    assert isinstance(adamw, AdamW) and isinstance(muon, Muon)
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert in_adamw == {id(model.transformer.wte.weight), id(model.lm_head.weight)}
    assert in_adamw.isdisjoint(in_muon) and len(in_adamw | in_muon) == len(list(model.parameters()))
    scale = (128 / 768) ** -0.5
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([0.004 * scale, 0.2 * scale])
    assert muon.param_groups[0]["lr"] == 0.02
    assert all(g["initial_lr"] == g["lr"] for opt in (adamw, muon) for g in opt.param_groups)


@pytest.fixture
def one_thread():
    # 50 steps of a tiny model are hundreds of tiny kernels; with 2 threads on shared, busy
    # cores each one can wait on a descheduled peer thread (seconds in all). One is enough.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_overfits_one_batch(one_thread):
    torch.manual_seed(0)
    model = make_model()
    optimizers = model.setup_optimizers()
    idx = torch.randint(0, VOCAB, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    first = None
    for _ in range(50):
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
    final = model(x, y).item()
    assert first > 4.0 and final < 0.1, (first, final)  # ~4.57 -> ~0.006 in practice


def test_generate_greedy_matches_argmax():
    model = randomize_outputs(make_model()).eval()
    prompt = [5, 6, 7]
    out = list(model.generate(prompt, max_tokens=6, temperature=0.0))
    ids = list(prompt)
    for _ in range(6):  # the same thing the slow way: full forward each step
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[3:]
    sampled = list(model.generate(prompt, max_tokens=6, temperature=1.0, top_k=5, seed=1))
    assert len(sampled) == 6 and all(0 <= t < VOCAB for t in sampled)
    assert sampled == list(model.generate(prompt, max_tokens=6, temperature=1.0, top_k=5, seed=1))


def test_bf16_embedding_with_and_without_autocast():
    # what init_weights does on CUDA, tried on CPU: the forward must work inside bf16 autocast
    # and outside it (plain inference), and agree with fp32 to bf16 precision
    model = randomize_outputs(make_model()).eval()
    idx = torch.randint(0, VOCAB, (2, 12))
    reference = model(idx)
    model.transformer.wte.to(dtype=torch.bfloat16)
    plain = model(idx)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast = model(idx)
        loss = model(idx, idx)
    assert plain.dtype == autocast.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(plain, reference, atol=0.03, rtol=0.02)  # measured max err ~0.01
    torch.testing.assert_close(autocast, reference, atol=0.1, rtol=0.05)  # ~0.03 (logits up to ~3)
