"""Tests for the mixture-of-experts MLP of nanochat/gpt.py (GPTConfig.n_experts > 0): batched
dispatch == a per-token reference, one expert == the dense MLP, the load-balancing loss, routing
weights, gradients, capacity, optimizers, KV-cached decoding, checkpoints, base_train options.

Run: python -m pytest tests/test_moe.py -q   (CPU, tiny models, about 15 s)
"""
import json
import re
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import nanochat.gpt as gpt_module
from nanochat.adamw import AdamW
from nanochat.checkpoint_manager import build_model, save_checkpoint
from nanochat.gpt import GPT, MLP, GPTConfig, MoE
from nanochat.muon import Muon

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 97


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed=0, **overrides):
    kw = dict(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    kw.update(overrides)
    with torch.device("meta"):
        model = GPT(GPTConfig(**kw))
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


def randomize_outputs(model, seed=1):
    """init zeroes every output projection (each block starts as the identity), which would hide
    dispatch bugs: give them weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("c_proj.weight", "w_proj")) or name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture(params=["loop", "bmm"])
def dispatch(request, monkeypatch):
    """Run the test with each way of running the experts (gpt.MOE_DISPATCH)."""
    monkeypatch.setattr(gpt_module, "MOE_DISPATCH", request.param)
    return request.param


def make_moe(n_experts=4, k=2, d=16, shared=False, capacity_factor=0.0, seed=0):
    config = GPTConfig(n_embd=d, n_head=1, n_kv_head=1, n_experts=n_experts, experts_per_token=k,
                       shared_expert=shared, moe_capacity_factor=capacity_factor)
    moe = MoE(config)
    torch.manual_seed(seed)
    moe.init_weights()
    with torch.no_grad():
        moe.w_proj.normal_(0, 0.1)
        if shared:
            moe.shared.c_proj.weight.normal_(0, 0.1)
    return moe


def reference_moe(moe, x):
    """The textbook definition, one token at a time."""
    out = torch.zeros_like(x)
    for n in range(x.size(0)):
        probs = moe.router.weight.mv(x[n]).softmax(dim=0)
        top_p, top_e = probs.topk(moe.top_k)
        gates = top_p / top_p.sum() if moe.top_k > 1 else top_p
        for gate, e in zip(gates, top_e):
            h = F.relu(moe.w_fc[e] @ x[n]).square()
            out[n] += gate * (moe.w_proj[e] @ h)
        if moe.shared is not None:
            out[n] += moe.shared(x[n])
    return out


@pytest.mark.parametrize("n_experts,k,shared", [(4, 2, False), (4, 1, True), (8, 3, False)])
def test_batched_dispatch_matches_per_token_reference(n_experts, k, shared, dispatch):
    moe = make_moe(n_experts, k, shared=shared)
    x = torch.randn(2, 20, 16, generator=torch.Generator().manual_seed(3))
    for training in (False, True):  # no capacity factor: training dispatches the same way
        moe.train(training)
        y = moe(x)
        assert y.shape == x.shape
        assert torch.allclose(y.view(-1, 16), reference_moe(moe, x.view(-1, 16)), atol=1e-5)


def test_one_expert_top1_equals_dense_mlp():
    dense = randomize_outputs(make_model(seed=0))
    moe = make_model(seed=5, n_experts=1, experts_per_token=1)
    state = {}
    for name, value in dense.state_dict().items():  # the dense weights in the MoE layout
        name = name.replace("mlp.c_fc.weight", "mlp.w_fc").replace("mlp.c_proj.weight", "mlp.w_proj")
        state[name] = value[None] if name.endswith(("w_fc", "w_proj")) else value
    for i in range(moe.config.n_layer):
        state[f"transformer.h.{i}.mlp.router.weight"] = moe.transformer.h[i].mlp.router.weight.detach()
    moe.load_state_dict(state, strict=True)
    idx = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    x, y = idx[:, :-1], idx[:, 1:]
    dense.eval(), moe.eval()
    assert torch.allclose(moe(x), dense(x), atol=1e-5)
    assert torch.allclose(moe(x, y), dense(x, y), atol=1e-5)  # eval: no auxiliary term
    # training: one expert takes all the load with probability 1, aux = 1, loss = CE + coef * 1
    dense.train(), moe.train()
    assert moe(x, y).item() == pytest.approx(dense(x, y).item() + moe.config.moe_aux_loss_coef, abs=1e-5)
    assert moe.moe_aux_loss.item() == pytest.approx(1.0)


def test_aux_loss_is_one_when_uniform_and_grows_with_imbalance():
    moe = make_moe(n_experts=4, k=1)
    x = torch.rand(64, 16) + 0.1  # positive inputs: a router row of ones favours its expert for every token
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform router probabilities
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    values = []
    for strength in (0.05, 0.2, 0.5, 20.0):
        with torch.no_grad():
            moe.router.weight.zero_()
            moe.router.weight[2] = strength
        moe(x)
        values.append(moe.aux_loss.item())
    assert 1.0 < values[0] < values[1] < values[2] < values[3]
    assert values[-1] == pytest.approx(4.0, abs=1e-3)  # total collapse onto one expert: n_experts
    # a balanced load with a uniform router (tokens split evenly by a hand-made router) is 1 too
    moe = make_moe(n_experts=2, k=1, d=2)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1e-3, 0.0], [0.0, 1e-3]]))
    moe(torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 8))
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-3)


def test_topk_routing_weights():
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    moe = make_moe(n_experts=6, k=3)
    experts, gates, probs = moe.route(x)
    assert torch.allclose(gates.sum(dim=-1), torch.ones(50), atol=1e-6)
    assert torch.equal(experts, probs.topk(3, dim=-1).indices)
    chosen = probs.gather(1, experts)
    assert torch.allclose(gates, chosen / chosen.sum(dim=-1, keepdim=True))
    assert (gates > 0).all() and len({tuple(r) for r in experts.sort(dim=-1).values.tolist()}) > 1
    # top-1 (Switch): the weight is the router probability itself, so the router learns from the loss
    experts, gates, probs = make_moe(n_experts=6, k=1).route(x)
    assert torch.equal(gates[:, 0], probs.max(dim=-1).values) and (gates < 1).all()


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(moe, n_tokens):
    x = torch.randn(n_tokens, 16, requires_grad=True)
    with OpCounter() as counter:
        moe(x).sum().backward()
    return counter.count


def test_no_python_loop_over_tokens(dispatch):
    """Forward + backward issue the same number of kernels for 8 or 512 tokens: the dispatch is
    batched, not a loop over tokens. "bmm" does not loop over the experts either; "loop" issues
    a fixed number of kernels per expert."""
    for k, shared in [(1, False), (2, True)]:
        small = count_ops(make_moe(n_experts=2, k=k, shared=shared), 8)
        assert count_ops(make_moe(n_experts=2, k=k, shared=shared), 512) == small
        big = count_ops(make_moe(n_experts=16, k=k, shared=shared), 512)
        if dispatch == "bmm":
            assert big == small
        else:
            per_expert = (count_ops(make_moe(n_experts=4, k=k, shared=shared), 64) - small) / 2
            assert per_expert > 0 and big == small + 14 * per_expert


@pytest.mark.parametrize("k", [1, 2])
def test_gradients_reach_used_experts_and_router(k, dispatch):
    moe = make_moe(n_experts=4, k=k, d=16)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    x[:, 0] = 5.0
    with torch.no_grad():
        moe.router.weight[3, 0] = -100.0  # expert 3 is never chosen
    moe(x).square().sum().backward()
    experts, _, _ = moe.route(x)
    used = set(experts.flatten().tolist())
    assert used == {0, 1, 2}
    for e in range(4):
        for w in (moe.w_fc, moe.w_proj):
            assert (w.grad[e].abs().sum() > 0) == (e in used), f"expert {e}"
    assert moe.router.weight.grad.abs().sum() > 0  # through the routing weights, also for top-1
    # the load-balancing loss alone also trains the router
    moe.zero_grad()
    moe(x)
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_capacity_factor_drops_overflow_in_training_only(dispatch):
    moe = make_moe(n_experts=4, k=1, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 5.0
    x = torch.rand(16, 16) + 0.1  # every token prefers expert 0; capacity = 1.0 * 16 / 4 = 4
    moe.train()
    y = moe(x)
    served = y.abs().sum(dim=-1) > 0
    assert served.sum().item() == 4 and served[:4].all()  # the first four (in token order) fit
    assert torch.allclose(y[:4], reference_moe(moe, x)[:4], atol=1e-6)
    moe.eval()  # eval (and decoding) never drops: results must not depend on the batch
    assert torch.allclose(moe(x), reference_moe(moe, x), atol=1e-6)
    moe.train()
    moe.capacity_factor = 4.0  # room for everyone: the same as no capacity limit
    assert torch.allclose(moe(x), reference_moe(moe, x), atol=1e-6)


def test_optimizers_muon_per_expert_and_router_adamw():
    model = make_model(n_experts=4, experts_per_token=2, shared_expert=True)
    adamw, muon = model.setup_optimizers()
    assert isinstance(adamw, AdamW) and isinstance(muon, Muon)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    adam_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    for moe in model.moe_layers():
        assert id(moe.w_fc) in muon_ids and id(moe.w_proj) in muon_ids and id(moe.shared.c_fc.weight) in muon_ids
        assert id(moe.router.weight) in adam_ids
    # Muon on a stack of experts == Muon on each expert matrix alone (Newton-Schulz per matrix)
    g = torch.Generator().manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(4, 24, 8, generator=g))
    singles = [torch.nn.Parameter(stacked.detach()[e].clone()) for e in range(4)]
    opt_stacked, opt_singles = Muon([stacked], lr=0.05), Muon(singles, lr=0.05)
    for _ in range(2):
        grad = torch.randn(4, 24, 8, generator=g)
        stacked.grad = grad.clone()
        for e, p in enumerate(singles):
            p.grad = grad[e].clone()
        opt_stacked.step(), opt_singles.step()
    for e, p in enumerate(singles):
        assert torch.allclose(stacked[e], p, atol=1e-5)


def test_active_params_and_flops():
    dense = make_model()
    moe = make_model(n_experts=4, experts_per_token=1)
    router = 2 * 32 * 4  # per layer: n_embd x n_experts, two layers
    assert dense.num_active_params() == dense.num_params()
    assert moe.num_params() == dense.num_params() + 2 * 3 * (2 * 32 * 128) + router  # 3 more experts per layer
    assert moe.num_active_params() == dense.num_params() + router
    assert moe.estimate_flops() == dense.estimate_flops() + 6 * router
    top2 = make_model(n_experts=4, experts_per_token=2, shared_expert=True)
    assert top2.num_active_params() == dense.num_params() + router + 2 * 2 * (2 * 32 * 128)
    every_other = make_model(n_experts=4, moe_every=2)
    assert [type(b.mlp) for b in every_other.transformer.h] == [MLP, MoE]


def test_dense_model_is_unchanged():
    """n_experts=0 builds the dense model of before: the same parameters, no MoE layer, and a
    training loss with no auxiliary term (its exact outputs were checked against the pre-MoE code)."""
    model = randomize_outputs(make_model())
    names = {n for n, _ in model.named_parameters()}
    assert names == {"transformer.wte.weight", "lm_head.weight"} | {
        f"transformer.h.{i}.{m}.weight" for i in range(2)
        for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert model.moe_layers() == [] and model.num_active_params() == model.num_params()
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    train_loss = model(idx[:, :-1], idx[:, 1:])
    model.eval()
    assert torch.equal(train_loss, model(idx[:, :-1], idx[:, 1:])) and model.moe_aux_loss is None
    # the config of a checkpoint saved before MoE existed still loads, as a dense model
    old = {k: v for k, v in model.config.__dict__.items() if "expert" not in k and not k.startswith("moe")}
    assert GPTConfig(**old) == model.config


def test_loss_reductions_with_aux_loss():
    model = randomize_outputs(make_model(n_experts=4, experts_per_token=2, moe_aux_loss_coef=0.1))
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    x, y = idx[:, :-1], idx[:, 1:].clone()
    y[0, :3] = -1
    per_token = model(x, y, loss_reduction="none")
    aux = model.moe_aux_loss
    n = (y >= 0).sum()
    assert model(x, y).item() == pytest.approx((per_token.sum() / n + 0.1 * aux).item(), abs=1e-5)
    assert model(x, y, loss_reduction="sum").item() == pytest.approx((per_token.sum() + 0.1 * aux * n).item(), rel=1e-5)
    model.eval()
    assert model(x, y).item() == pytest.approx((per_token.sum() / n).item(), abs=1e-5)


def test_kv_cache_generation_matches_full_forward(dispatch):
    model = randomize_outputs(make_model(n_experts=4, experts_per_token=2, shared_expert=True, n_kv_head=1))
    model.eval()
    prompt = [5, 17, 3, 88, 41]
    cached = list(model.generate(prompt, max_tokens=12, temperature=0))
    ids = list(prompt)
    for _ in range(12):  # no cache: the whole sequence each time
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert cached == ids[len(prompt):]
    assert len(set(cached)) > 1  # not a degenerate constant stream


def test_moe_trains_and_checkpoint_round_trip(tmp_path):
    model = make_model(n_experts=4, experts_per_token=1, shared_expert=True, moe_every=2, n_layer=2)
    optimizers = model.setup_optimizers()
    idx = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(12):
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    ckdir = str(tmp_path / "base_checkpoints" / "d2_moe")
    save_checkpoint(ckdir, 12, model.state_dict(), None, {"model_config": model.config.__dict__})
    assert json.load(open(os.path.join(ckdir, "meta_000012.json")))["model_config"]["n_experts"] == 4
    loaded, meta = build_model(ckdir, 12, "cpu")
    assert loaded.config == model.config and isinstance(loaded.transformer.h[1].mlp, MoE)
    model.eval()
    assert torch.equal(loaded(idx[:, :-1]), model(idx[:, :-1]))


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory):
    """A base dir with a few hundred synthetic documents and a 300-token tokenizer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanochat.tokenizer import RustBPETokenizer
    base = tmp_path_factory.mktemp("moe_base")
    (base / "base_data").mkdir()
    g = torch.Generator().manual_seed(0)
    words = "the cat dog sat ran on a mat log red blue big small and then it was".split()
    for split, n in [("train", 300), ("val", 40)]:
        texts = [" ".join(words[i] for i in torch.randint(0, len(words), (60,), generator=g).tolist()) for _ in range(n)]
        pq.write_table(pa.table({"text": texts, "source": ["test"] * n}), str(base / "base_data" / f"{split}_00000.parquet"))
    RustBPETokenizer.train_from_iterator(texts, 300).save(str(base / "tokenizer"))
    return str(base)


def test_base_train_moe_options_and_checkpoint(tiny_base_dir):
    args = ["--depth=1", "--max_seq_len=32", "--device_batch_size=2", "--total_batch_size=64", "--num_iterations=3",
            "--eval_every=3", "--eval_tokens=64", "--sample_every=-1", "--n_experts=4", "--experts_per_token=1",
            "--shared_expert=True", "--moe_aux_loss_coef=0.02"]
    env = {**os.environ, "NANOCHAT_BASE_DIR": tiny_base_dir, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "active per token" in proc.stdout and "moe aux" in proc.stdout
    ckdir = os.path.join(tiny_base_dir, "base_checkpoints", "d1_moe4x1")  # not the dense d1's directory
    model, meta = build_model(ckdir, 3, "cpu")
    c = meta["model_config"]
    assert (c["n_experts"], c["experts_per_token"], c["shared_expert"], c["moe_aux_loss_coef"]) == (4, 1, True, 0.02)
    assert isinstance(model.transformer.h[0].mlp, MoE) and model.transformer.h[0].mlp.shared is not None


@pytest.mark.slow
def test_base_train_moe_ddp_matches_one_process(tiny_base_dir):
    """torchrun with 2 ranks (DistMuon on the expert stacks, DistAdamW on the routers) gives the
    losses of 1 process with 2 accumulation micro-batches."""
    args = ["--depth=1", "--max_seq_len=32", "--device_batch_size=2", "--total_batch_size=128", "--num_iterations=4",
            "--eval_every=-1", "--eval_tokens=64", "--sample_every=-1", "--n_experts=4", "--experts_per_token=2",
            "--shared_expert=True"]
    env = {**os.environ, "NANOCHAT_BASE_DIR": tiny_base_dir, "OMP_NUM_THREADS": "1"}
    outputs = []
    for launcher, tag in [([], "one"), (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], "two")]:
        cmd = [sys.executable, *launcher, "-m", "scripts.base_train", *args, f"--model_tag=ddp_{tag}"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        outputs.append([float(v) for v in re.findall(r"^step \d+/\d+ .*\| loss ([0-9.]+) ", proc.stdout, re.M)])
    assert len(outputs[0]) == 4 and outputs[0] == pytest.approx(outputs[1], abs=1e-5)
