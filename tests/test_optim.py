"""Tests for nanochat/adamw.py and nanochat/muon.py, including the sharded distributed variants
(2 processes on gloo, spawned by the test).

Run: python -m pytest tests/test_optim.py -q   (CPU, a few seconds; the 2-process tests spawn)
"""
import io
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.adamw import AdamW, DistAdamW
from nanochat.gpt import GPT, GPTConfig
from nanochat.muon import DistMuon, Muon, zeropower_via_newtonschulz5

WORLD_SIZE = 2
STEPS = 3
# Shapes chosen to exercise the awkward cases: a first dim (7, 5) that 2 does not divide, an
# odd element count, a 1-D param, three same-shaped matrices (one rank owns two), a 3-D stack.
ADAM_SHAPES = [(7, 3), (5,), (8, 4), (3, 3)]
MUON_SHAPES = [(8, 4), (8, 4), (8, 4), (5, 12), (6, 6), (2, 4, 3)]


def make_params(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def rank_grads(shapes, step, rank):
    """The gradient rank `rank` sees at `step` (deterministic, different per rank)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(s, generator=g) for s in shapes]


def averaged_grads(shapes, step):
    per_rank = [rank_grads(shapes, step, r) for r in range(WORLD_SIZE)]
    return [sum(gs) / WORLD_SIZE for gs in zip(*per_rank)]


ADAM_KW = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
MUON_KW = dict(lr=0.02, momentum=0.9, weight_decay=0.05)
MAX_NORM = 0.05  # global-norm clipping in the GPT test; the tiny GPT's gradient norm is larger


def run_single(kind, shapes):
    """The single-process reference, fed the averaged gradients."""
    params = make_params(shapes, seed=0)
    opt = AdamW(params, **ADAM_KW) if kind == "adamw" else Muon(params, **MUON_KW)
    for step in range(STEPS + 1):  # the ranks take one more step after their resume check
        for p, g in zip(params, averaged_grads(shapes, step)):
            p.grad = g
        opt.step()
    return [p.detach() for p in params]


def tiny_gpt():
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=16, vocab_size=61, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


def gpt_batch(step, rank):
    g = torch.Generator().manual_seed(500 + 10 * step + rank)
    idx = torch.randint(0, 61, (2, 17), generator=g)
    return idx[:, :-1], idx[:, 1:]


def _dist_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        out = {}
        # each optimizer alone, fed rank-specific gradients
        for kind, shapes in (("adamw", ADAM_SHAPES), ("muon", MUON_SHAPES)):
            params = make_params(shapes, seed=0)
            opt = DistAdamW(params, **ADAM_KW) if kind == "adamw" else DistMuon(params, **MUON_KW)
            for step in range(STEPS):
                grads = rank_grads(shapes, step, rank)
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                opt.step()
                for p, g in zip(params, grads):  # the local gradients are left as they were
                    assert torch.equal(p.grad, g)
            # resume: a fresh optimizer loaded from this rank's state_dict continues identically
            copies = [p.detach().clone().requires_grad_() for p in params]
            resumed = DistAdamW(copies, **ADAM_KW) if kind == "adamw" else DistMuon(copies, **MUON_KW)
            buf = io.BytesIO()  # through bytes, as a checkpoint does (and loadable weights_only)
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            resumed.load_state_dict(torch.load(buf, weights_only=True))
            for o, ps in ((opt, params), (resumed, copies)):
                for p, g in zip(ps, rank_grads(shapes, STEPS, rank)):
                    p.grad = g
                o.step()
            out[kind] = {"params": [p.detach() for p in params], "n_state": len(opt.state),
                         "resumed_equal": all(torch.equal(a, b) for a, b in zip(params, copies))}
        # a GPT through setup_optimizers, each rank on its own batch, clipped by the global
        # norm: reduce_gradients() -> one all-reduce -> grad_scale -> step()
        model = tiny_gpt()
        optimizers = model.setup_optimizers()
        out["optimizer_types"] = [type(opt).__name__ for opt in optimizers]
        out["norms"] = []
        for step in range(STEPS):
            x, y = gpt_batch(step, rank)
            model(x, y).backward()
            sq = sum(opt.reduce_gradients() for opt in optimizers)
            dist.all_reduce(sq)
            norm = sq.sqrt().item()
            for opt in optimizers:
                opt.grad_scale = min(1.0, MAX_NORM / (norm + 1e-6))
            out["norms"].append(norm)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
        out["gpt"] = model.state_dict()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    """One 2-process gloo run (spawning costs a torch import per process) for all dist tests."""
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_dist_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


# ---------------------------------------------------------------------------- AdamW

@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_matches_torch(foreach):
    shapes = [(16, 8), (8,), (3, 4, 5)]
    ours, ref = make_params(shapes, seed=0), make_params(shapes, seed=0)
    opt_ours = AdamW(ours, lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref, lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1, foreach=foreach)
    for step in range(10):
        if step == 5:  # a schedule changing lr mid-run
            for opt in (opt_ours, opt_ref):
                opt.param_groups[0]["lr"] = 0.003
        for a, b, g in zip(ours, ref, rank_grads(shapes, step, 0)):
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_ref.step()
    for a, b, start in zip(ours, ref, make_params(shapes, seed=0)):
        assert not torch.equal(a, start)  # it moved
        assert torch.equal(a, b), (a - b).abs().max()  # same ops, same order: bit-identical on CPU


def test_adamw_skips_params_without_grad():
    p, q = make_params([(4,), (4,)], seed=0)
    before = q.detach().clone()
    p.grad = torch.ones(4)
    AdamW([p, q], lr=0.1, weight_decay=0.1).step()
    assert torch.equal(q, before)


# ---------------------------------------------------------------------------- Muon

@pytest.mark.parametrize("shape", [(64, 128), (128, 32), (256, 64), (4, 32, 96)])
def test_newton_schulz_is_orthogonal_ish(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    X = zeropower_via_newtonschulz5(G, steps=5)
    assert X.shape == G.shape and X.dtype == torch.float32
    s = torch.linalg.svdvals(X)
    # The quintic's coefficients trade exactness for speed: after 5 steps the singular values
    # sit in about [0.68, 1.14] for these shapes (whatever the input's spread); allow [0.6, 1.25].
    assert s.min() > 0.6 and s.max() < 1.25, (s.min().item(), s.max().item())


def test_newton_schulz_keeps_singular_vectors():
    G = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    X = zeropower_via_newtonschulz5(G)
    # X should be U diag(~1) Vh: the same singular subspaces, flattened spectrum
    core = U.T @ X @ Vh.T
    off_diag = core - torch.diag(torch.diagonal(core))
    assert off_diag.abs().max() < 1e-3 and torch.diagonal(core).min() > 0.5


def test_muon_reduces_a_loss():
    torch.manual_seed(0)
    target = torch.randn(32, 16)
    W = torch.zeros(32, 16, requires_grad=True)
    opt = Muon([W], lr=0.1, momentum=0.9)
    losses = []
    for _ in range(60):
        loss = ((W - target) ** 2).mean()
        loss.backward()
        opt.step()
        W.grad = None
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


def test_muon_momentum_is_a_group_value():
    # a schedule may change momentum per step; the update must use the group's current value
    results = []
    for momentum in (0.85, 0.95):
        (W,) = make_params([(8, 4)], seed=0)
        opt = Muon([W], lr=0.02, momentum=0.5)
        for step in range(3):
            opt.param_groups[0]["momentum"] = momentum
            W.grad = rank_grads([(8, 4)], step, 0)[0]
            opt.step()
        results.append(W.detach().clone())
    assert not torch.allclose(results[0], results[1])


def test_muon_refuses_vectors():
    with pytest.raises(AssertionError, match="matrices"):
        Muon(make_params([(4,)], seed=0))


# ---------------------------------------------------------------------------- distributed

@pytest.mark.parametrize("kind,shapes", [("adamw", ADAM_SHAPES), ("muon", MUON_SHAPES)])
def test_distributed_matches_single_process(kind, shapes, dist_results):
    expected = run_single(kind, shapes)
    for r, result in enumerate(dist_results):
        assert result[kind]["resumed_equal"], f"rank {r}: {kind} did not resume from its state_dict"
        for p, e in zip(result[kind]["params"], expected):
            torch.testing.assert_close(p, e, atol=1e-6, rtol=0, msg=f"rank {r}, shape {tuple(e.shape)}")
    if kind == "muon":
        # the momentum state is sharded: the 6 matrices are dealt out 3 and 3
        assert [res["muon"]["n_state"] for res in dist_results] == [3, 3]
    else:
        # every rank keeps a (1/world) slice of the moments for every parameter
        assert [res["adamw"]["n_state"] for res in dist_results] == [len(shapes)] * WORLD_SIZE


def test_distributed_gpt_matches_averaged_gradients(dist_results):
    assert dist_results[0]["optimizer_types"] == ["DistAdamW", "DistMuon"]
    model = tiny_gpt()
    optimizers = model.setup_optimizers()
    assert [type(opt).__name__ for opt in optimizers] == ["AdamW", "Muon"]
    norms = []
    for step in range(STEPS):
        for rank in range(WORLD_SIZE):  # accumulate both ranks' gradients, then average
            x, y = gpt_batch(step, rank)
            model(x, y).backward()
        for p in model.parameters():
            p.grad /= WORLD_SIZE
        norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
        # Clip with the coefficient the ranks used: the two norms differ in the last bits (sum
        # order), and the embedding's large Adam lr at width 32 amplifies that to ~1e-6.
        scale = min(1.0, MAX_NORM / (dist_results[0]["norms"][step] + 1e-6))
        for p in model.parameters():
            p.grad.mul_(scale)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert max(norms) > MAX_NORM  # clipping did happen
    for r, result in enumerate(dist_results):
        assert result["norms"] == pytest.approx(norms, rel=1e-5)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(result["gpt"][name], value, atol=1e-6, rtol=0, msg=f"rank {r}, {name}")
