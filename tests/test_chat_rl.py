"""
RL with verifiable rewards: group advantages, the clipped policy-gradient loss, the k3 KL,
the mask (only sampled tokens are trained), pass@k, one gradient step on a tiny model, and
scripts/chat_rl end to end (3 steps, then --resume matching a straight run) on a tiny model.
Run: nice -n 10 python -m pytest tests/test_chat_rl.py -q
"""
import itertools
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat import tasks
from nanochat.chat_data import render_example
from nanochat.rows import rows_to_batch
from nanochat.checkpoint_manager import load_checkpoint, save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tasks import LongArithmetic
from nanochat.rl import (completion_text, format_score, group_advantages, kl_k3, pass_at_k, policy_loss,
                         rollout_batch, sample_group, shaped_reward, token_logprobs)
from nanochat.tokenizer import RustBPETokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_RE = re.compile(r"^step (\d+)/(\d+) .*\| loss (-?[0-9.]+) .*\| reward ([0-9.]+) ", re.M)


# ----------------------------------------------------------------------------- advantages, loss, KL, pass@k

def test_advantages_sum_to_zero_per_group_and_vanish_for_equal_rewards():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5, 0.5], [0.0, 0.2, 0.9, 0.1, 0.0]])
    for normalize_std in (True, False):
        adv = group_advantages(rewards, normalize_std=normalize_std)
        assert adv.shape == rewards.shape
        assert torch.allclose(adv.sum(dim=-1), torch.zeros(3), atol=1e-5)
        assert torch.equal(adv[1], torch.zeros(5))  # equal rewards: no signal
        assert (adv[0] > 0).tolist() == [True, False, False, True, True]  # better than the group mean -> positive
    assert torch.allclose(group_advantages(rewards, normalize_std=False)[0], torch.tensor([0.4, -0.6, -0.6, 0.4, 0.4]))
    adv = group_advantages(rewards)
    for g in (0, 2):  # divided by the population std: unit spread
        assert adv[g].pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(group_advantages([1.0, 0.0]), torch.tensor([1.0, -1.0]), atol=1e-5)  # one group, 1-D


def test_clipped_loss_is_plain_policy_gradient_at_ratio_one():
    torch.manual_seed(0)
    logp = (torch.randn(3, 5) - 2).requires_grad_()
    adv = torch.tensor([1.5, -0.5, 0.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, logp)
    # REINFORCE: loss value -sum(A) / n and gradient -A / n on every sampled token, 0 elsewhere
    n = mask.sum()
    assert loss.item() == pytest.approx(-(adv[:, None] * mask).sum().item() / n.item(), abs=1e-6)
    assert torch.allclose(grad, -(adv[:, None] * mask) / n)
    loss_noclip, _ = policy_loss(logp, logp.detach(), adv, mask, clip_eps=0.0)
    assert loss_noclip.item() == pytest.approx(loss.item(), abs=1e-6)


@pytest.mark.parametrize("ratio,adv,clipped", [(1.5, 1.0, True), (1.1, 1.0, False), (0.5, 1.0, False),
                                               (0.5, -1.0, True), (1.5, -1.0, False), (0.9, -1.0, False)])
def test_clipping_beyond_epsilon(ratio, adv, clipped):
    """PPO: a token whose ratio left [1-e, 1+e] in the direction the advantage pushes gets no gradient."""
    eps = 0.2
    old = torch.full((1, 1), -1.0)
    logp = (old + math.log(ratio)).requires_grad_()
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, stats = policy_loss(logp, old, torch.tensor([adv]), mask, clip_eps=eps)
    (grad,) = torch.autograd.grad(loss, logp)
    if clipped:
        bound = 1 + eps if adv > 0 else 1 - eps
        assert loss.item() == pytest.approx(-bound * adv, abs=1e-6)
        assert grad.item() == 0.0
        assert stats["clip_sum"].item() == 1.0
    else:
        assert loss.item() == pytest.approx(-ratio * adv, abs=1e-6)
        assert grad.item() == pytest.approx(-ratio * adv, abs=1e-6)  # d(-rho A)/d logp = -rho A
        assert stats["clip_sum"].item() == 0.0


def test_kl_term_is_zero_when_policy_equals_reference():
    torch.manual_seed(1)
    logp = (torch.randn(2, 6) - 1).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 6, dtype=torch.bool)
    assert torch.equal(kl_k3(logp.detach(), logp.detach()), torch.zeros(2, 6))
    base, _ = policy_loss(logp, logp.detach(), adv, mask)
    with_kl, stats = policy_loss(logp, logp.detach(), adv, mask, ref_logp=logp.detach(), beta=0.5)
    assert with_kl.item() == pytest.approx(base.item(), abs=1e-7) and stats["kl_sum"].item() == 0.0
    g_base = torch.autograd.grad(base, logp)[0]
    g_kl = torch.autograd.grad(with_kl, logp)[0]
    assert torch.allclose(g_base, g_kl)  # KL's gradient vanishes at the reference
    # away from the reference the k3 term is positive and pulls log-probs back towards it
    ref = logp.detach() + 0.3
    assert (kl_k3(logp.detach(), ref) > 0).all()
    loss_far, stats = policy_loss(logp, logp.detach(), torch.zeros(2), mask, ref_logp=ref, beta=1.0)
    assert loss_far.item() > 0 and stats["kl_sum"].item() > 0
    assert (torch.autograd.grad(loss_far, logp)[0] < 0).all()  # descending raises logp towards ref


def test_pass_at_k_known_cases():
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 2, 3) == 1.0  # any 3 of 4 include a correct one
    for n in range(1, 7):  # brute force: the fraction of k-subsets holding a correct sample
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def test_rewards_format_bonus_and_long_arithmetic():
    task = LongArithmetic("test", size=20, min_digits=5, max_digits=6)
    train = LongArithmetic("train", size=20, min_digits=5, max_digits=6)
    test_questions = {c["conversations"][0]["content"] for c in task}
    assert not test_questions & {c["conversations"][0]["content"] for c in train}
    for conv in task:
        assert task.evaluate(conv, tasks.last_assistant_text(conv))  # the gold reply passes its checker
        assert len(conv["answer"].lstrip("-")) >= 4  # long operands, long answers (5-digit / 2-digit >= 4 digits)
    conv = task.get(0)
    wrong = str(int(conv["answer"]) + 1)
    assert shaped_reward(task, conv, f"The answer is {conv['answer']}.", True) == 1.0
    assert shaped_reward(task, conv, f"The answer is {wrong}.", True) == 0.0
    assert shaped_reward(task, conv, f"The answer is {wrong}.", True, reward_weight=0.75) == 0.25  # format only
    assert shaped_reward(task, conv, f"The answer is {wrong}.", False, reward_weight=0.75) == 0.0  # cut off
    assert shaped_reward(task, conv, f"The answer is {conv['answer']}.", True, reward_weight=0.75) == 1.0
    assert format_score(conv, "no number here", True) == 0.0
    assert format_score({"kind": "spell"}, "cat is spelled c-a-t.", True) == 1.0


# ----------------------------------------------------------------------------- tiny model + tokenizer

def arithmetic_texts(n):
    out = []
    for conv in tasks.Arithmetic("train", size=n):
        out.append(conv["conversations"][0]["content"] + " " + tasks.last_assistant_text(conv))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return RustBPETokenizer.train_from_iterator(arithmetic_texts(400), 300)


def tiny_config(tokenizer):
    return GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32)


@pytest.fixture(scope="module")
def tiny_sft(tokenizer):
    """A tiny model taught the arithmetic reply format for a few hundred Adam steps (about a
    second): its samples then end, call the tool and give numbers, so rewards differ."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead, more so on a busy machine
    try:
        torch.manual_seed(0)
        model = GPT(tiny_config(tokenizer))
        model.init_weights()
        rows = [render_example(tokenizer, conv, 95) for conv in tasks.Arithmetic("train", size=64)]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(100):
            batch = rows[(step * 16) % 64:(step * 16) % 64 + 16]
            inputs, targets = rows_to_batch(batch, 95, tokenizer.get_bos_token_id(), "cpu")
            loss = model(inputs, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 1.0  # it learned the format
    return model


def test_only_sampled_tokens_get_loss(tokenizer):
    sp = tokenizer.encode_special
    prompt = [tokenizer.get_bos_token_id(), sp("<|user_start|>"), 40, 41, sp("<|user_end|>"), sp("<|assistant_start|>")]
    # the model writes a tool call, the engine forces <|output_start|> 42 <|output_end|> (mask 0), the model ends
    completion = [sp("<|python_start|>"), 50, sp("<|python_end|>"), sp("<|output_start|>"), 52, sp("<|output_end|>"),
                  60, sp("<|assistant_end|>")]
    masks = [1, 1, 1, 0, 0, 0, 1, 1]
    short = ([1, 2, 3], [70, sp("<|assistant_end|>")], [1, 1])
    inputs, targets = rollout_batch([(prompt, completion, masks), short], pad_id=tokenizer.get_bos_token_id())
    assert inputs.shape == targets.shape == (2, len(prompt) + len(completion) - 1)
    full = prompt + completion
    want = [full[t + 1] if t + 1 >= len(prompt) and masks[t + 1 - len(prompt)] else -1 for t in range(len(full) - 1)]
    assert targets[0].tolist() == want
    assert targets[1].tolist() == [-1, -1, 70, sp("<|assistant_end|>")] + [-1] * (len(full) - 5)  # padding untrained
    assert inputs[0].tolist() == full[:-1]
    # the loss ignores what the model thinks of forced tokens, the prompt and padding
    torch.manual_seed(0)
    logp = torch.randn(targets.shape).requires_grad_()
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), targets >= 0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.equal(grad != 0, targets >= 0)
    assert loss.item() == pytest.approx(-(1.0 * 5 - 1.0 * 2) / 7, abs=1e-6)  # normalised by the 7 sampled tokens


def test_engine_samples_keep_the_stop_token_and_tool_masks(tokenizer, tiny_sft):
    engine = Engine(tiny_sft, tokenizer)
    task = tasks.Arithmetic("train", size=8)
    seen_forced = seen_finished = False
    for i in range(4):
        prompt = tokenizer.render_for_completion(task.get(i))
        for toks, masks, finished in sample_group(engine, prompt, 4, 48, temperature=1.0, seed=i):
            assert len(toks) == len(masks) and -1 not in toks
            assert finished == (bool(toks) and toks[-1] in engine.stop_ids)
            if finished:
                seen_finished = True
                assert masks[-1] == 1  # the model chose to stop: trained
                assert completion_text(tokenizer, toks, engine.stop_ids) == tokenizer.decode(toks[:-1])
            for t, m in zip(toks, masks):
                if t == tokenizer.encode_special("<|output_start|>"):
                    seen_forced = True
                    assert m == 0  # tool output is forced by the engine, never trained
    assert seen_finished and seen_forced


def test_gradient_step_raises_logprob_of_positive_advantage_sample(tokenizer, tiny_sft):
    model = GPT(tiny_config(tokenizer))
    model.load_state_dict(tiny_sft.state_dict())
    engine = Engine(model, tokenizer)
    conv = tasks.Arithmetic("train", size=1).get(0)
    prompt = tokenizer.render_for_completion(conv)
    samples = sample_group(engine, prompt, 2, 40, temperature=1.0, seed=3)
    sequences = [(prompt, toks, masks) for toks, masks, _ in samples]
    inputs, targets = rollout_batch(sequences, tokenizer.get_bos_token_id())
    assert (targets >= 0).sum(dim=1).min() > 0

    def seq_logp():
        with torch.no_grad():
            return token_logprobs(model, inputs, targets).sum(dim=1)

    before = seq_logp()
    adv = torch.tensor([1.0, -1.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    logp = token_logprobs(model, inputs, targets)
    loss, _ = policy_loss(logp, logp.detach(), adv, targets >= 0)
    loss.backward()
    opt.step()
    after = seq_logp()
    assert after[0] > before[0]  # positive advantage: more likely
    assert after[1] < before[1]  # negative advantage: less likely


# ----------------------------------------------------------------------------- the script

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer, tiny_sft):
    base = tmp_path_factory.mktemp("nanochat_rl")
    tokenizer.save(str(base / "tokenizer"))
    c = tiny_config(tokenizer)
    model_config = {k: getattr(c, k) for k in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "softcap")}
    save_checkpoint(str(base / "chatsft_checkpoints" / "t1"), 5, tiny_sft.state_dict(), None, {"model_config": model_config})
    return str(base)


def run_rl(base_dir, args, timeout=120):
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "NANOCHAT_REPORT_DIR": os.path.join(base_dir, "report"),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_rl", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"chat_rl failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


SMALL = ["--device_type=cpu", "--prompts_per_step=3", "--num_samples=4", "--max_new_tokens=40", "--device_batch_size=5",
         "--ppo_epochs=2", "--beta=0.05", "--reward_weight=0.5", "--spelling_examples=0", "--arithmetic_examples=100",
         "--long_arithmetic_examples=100", "--eval_tasks=arithmetic,long_arithmetic", "--eval_problems=2",
         "--eval_samples=3", "--eval_k=2", "--eval_every=2", "--init_lr_frac=0.3", "--save_every=3"]


def test_chat_rl_runs_and_resumes_like_a_straight_run(base_dir):
    straight = run_rl(base_dir, SMALL + ["--num_iterations=4", "--model_tag=straight"])
    steps = STEP_RE.findall(straight)
    assert [int(s) for s, *_ in steps] == [1, 2, 3, 4]
    assert any(float(loss) != 0.0 for _, _, loss, _ in steps)  # some group's rewards differed: it trained
    assert len(re.findall(r"^step 0000[024] \| arithmetic pass@1 [0-9.]+ \| arithmetic pass@2 [0-9.]+ \| "
                          r"long_arithmetic pass@1 [0-9.]+ \| long_arithmetic pass@2", straight, re.M)) == 3
    assert os.path.exists(os.path.join(base_dir, "report", "sections", "chat-rl.json"))
    rl_dir = os.path.join(base_dir, "chatrl_checkpoints")
    sft, _, _ = load_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", "t1"), 5, "cpu")
    a, _, meta_a = load_checkpoint(os.path.join(rl_dir, "straight"), 4, "cpu")
    assert any(not torch.equal(a[k], sft[k]) for k in a)  # RL changed the weights

    # a run stopped after step 3 (its step-3 checkpoint, save_every=3) and resumed ends where the straight one did
    shutil.copytree(os.path.join(rl_dir, "straight"), os.path.join(rl_dir, "resumed"))
    for name in os.listdir(os.path.join(rl_dir, "resumed")):
        if name.startswith(("model_000004", "meta_000004", "optim_000004")):
            os.unlink(os.path.join(rl_dir, "resumed", name))
    resumed = run_rl(base_dir, SMALL + ["--num_iterations=4", "--model_tag=resumed", "--resume"])
    assert "resumed from" in resumed and [int(s) for s, *_ in STEP_RE.findall(resumed)] == [4]
    assert STEP_RE.findall(resumed)[0][2:] == steps[3][2:]  # same loss and reward at step 4
    b, _, meta_b = load_checkpoint(os.path.join(rl_dir, "resumed"), 4, "cpu")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a["history"] == meta_b["history"]
