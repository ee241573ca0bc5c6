"""
The GPU code paths, exercised on CPU: base_train under torch.compile (CPU inductor) and under bf16
autocast, a MoE with a capacity factor compiled as one graph, Muon's Newton-Schulz in bf16, and the
MFU's FLOPs per token against a hand count and torch's FLOP counter. Each is held against eager
fp32 with a stated tolerance.
Run: python -m pytest tests/test_gpu_paths.py -q     (the first compile takes ~30 s on 2 cores)
"""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nanochat.gpt import GPT, GPTConfig
from nanochat.muon import zeropower_via_newtonschulz5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_RE = re.compile(r"^step (\d+)/\d+ .*\| loss ([0-9.]+) ", re.M)
TINY = ["--depth=2", "--max_seq_len=64", "--device_batch_size=4", "--total_batch_size=256", "--num_iterations=4",
        "--eval_every=-1", "--eval_tokens=256", "--sample_every=-1", "--device_type=cpu"]
COMPILED_TOL = 1e-4   # fp32 compiled vs eager: the same math, fused differently (seen: <= 2e-7 relative)
BF16_TOL = 2e-2       # bf16 autocast vs fp32: ~3 significant digits per matmul (seen: ~3e-5 on these steps)


def train(base_dir, default_data_dir, *extra, tag):
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", *TINY, f"--data_dir={default_data_dir}",
                           f"--model_tag={tag}", *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = {int(s): float(v) for s, v in STEP_RE.findall(proc.stdout)}
    assert sorted(losses) == [1, 2, 3, 4]
    return losses, proc.stdout


def close(a, b, tol):
    return all(abs(a[s] - b[s]) <= tol * abs(b[s]) for s in b)


def test_base_train_compiled_and_bf16_agree_with_eager_fp32(tokenizer_base_dir, default_data_dir):
    base_dir = tokenizer_base_dir
    eager, out = train(base_dir, default_data_dir, "--compile=False", tag="eager")
    assert "compute: cpu, float32, torch.compile off" in out
    compiled, out = train(base_dir, default_data_dir, "--compile=True", tag="compiled")
    assert "compute: cpu, float32, torch.compile on" in out
    assert close(compiled, eager, COMPILED_TOL), (compiled, eager)
    bf16, out = train(base_dir, default_data_dir, "--compile=False", "--dtype=bfloat16", tag="bf16")
    assert "compute: cpu, bfloat16, torch.compile off" in out
    assert close(bf16, eager, BF16_TOL), (bf16, eager)
    assert bf16 != eager  # the autocast really ran in bf16


def moe_model(capacity_factor):
    config = GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, n_experts=4,
                       experts_per_token=2, moe_capacity_factor=capacity_factor)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    with torch.no_grad():  # output projections start at zero; give the experts something to say
        for block in model.transformer.h:
            block.mlp.w_proj.normal_(0, 0.05)
    return model


def test_moe_with_capacity_compiles_to_one_graph_and_matches_eager():
    model = moe_model(1.25)
    x = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    explained = torch._dynamo.explain(model)(x, y)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(model, dynamic=False)
    grads = []
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        loss = m(x, y)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_e, g_e), (loss_c, g_c) = grads
    assert abs(loss_c - loss_e) <= COMPILED_TOL * abs(loss_e)
    for a, b in zip(g_c, g_e):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("shape", [(256, 128), (64, 192), (4, 96, 32)])
def test_newton_schulz_in_bf16_agrees_with_fp32(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    fp32 = zeropower_via_newtonschulz5(G, dtype=torch.float32)
    bf16 = zeropower_via_newtonschulz5(G, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    # bf16 keeps ~3 digits per matmul over 15 matmuls: the update moves by a few percent of its size
    rel = (bf16.float() - fp32).norm() / fp32.norm()
    assert 0 < rel < 0.05, rel
    s = torch.linalg.svdvals(bf16.float())
    assert s.min() > 0.55 and s.max() < 1.3, (s.min(), s.max())  # still orthogonal-ish


def test_flops_per_token_against_a_hand_count_and_the_flop_counter():
    # depth 2, width 128, 2 heads of 64, vocab 512, context 64
    config = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    per_layer = 4 * 128 * 128 + 2 * 4 * 128 * 128   # q, k, v, proj + MLP up and down (4x)
    matmul_weights = 2 * per_layer + 128 * 512       # + lm_head; the embedding is a lookup
    attention = 2 * 2 * (2 * 64 * 64)                # per token and layer: QK^T and AV, 2 FLOPs x heads x head_dim x context
    hand = 3 * (2 * matmul_weights + 2 * attention)   # 2 FLOPs per multiply-add; backward is twice the forward
    assert hand == 6 * 458752 + 3 * 65536 == 2949120
    assert model.estimate_flops() == hand
    # torch's counter over a real forward + backward (plain loss path: the one GPUs take)
    B, T = 2, 64
    x = torch.randint(0, 512, (B, T))
    import nanochat.gpt as gpt_module
    chunk = gpt_module.LOSS_CHUNK_ELEMENTS
    gpt_module.LOSS_CHUNK_ELEMENTS = 0
    try:
        with FlopCounterMode(display=False) as counter:
            model(x, torch.roll(x, -1, 1)).backward()
    finally:
        gpt_module.LOSS_CHUNK_ELEMENTS = chunk
    counted = counter.get_total_flops() / (B * T)
    # the counter charges causal attention as full attention, as the estimate does; the rest is
    # exact matmuls, except that backward does not need the input gradient of the first layer
    assert abs(counted - hand) / hand < 0.03, (counted, hand)
