"""
DPO: the loss is log 2 while policy == reference and one gradient step prefers the chosen reply;
log-probs count the final response's tokens only; scripts/chat_dpo runs 3 steps on CPU on a tiny
model (default verifiable pairs, and user JSONL pairs with LoRA and a live reference), and resumes.
Run: nice -n 10 python -m pytest tests/test_dpo.py -q
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanochat import dpo, tasks
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.dataset import parquets_iter_batched
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_RE = re.compile(r"^step (\d+)/(\d+) .*\| loss ([0-9.]+) .*\| margin (-?[0-9.]+) \| acc", re.M)
EVAL_RE = re.compile(r"^step (\d+) \| held-out loss ([0-9.]+) \| held-out margin (-?[0-9.]+) \| reward acc ([0-9.]+)", re.M)


@pytest.fixture(scope="module")
def tokenizer(default_data_dir):
    texts = []
    for batch in parquets_iter_batched("train", data_dir=default_data_dir):
        texts.extend(t[:2000] for t in batch)
        if len(texts) >= 200:
            break
    return RustBPETokenizer.train_from_iterator(texts[:200] + ["What is plus The answer is 答案是"] * 20, 512)


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
    model.init_weights()
    with torch.no_grad():  # init zeroes the output projections and shrinks lm_head: give it some opinions
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.05)
            block.mlp.c_proj.weight.normal_(std=0.05)
        model.lm_head.weight.normal_(std=0.05)
    return model


def arithmetic_pairs(n, split="train"):
    return list(tasks.VerifiablePairs(tasks.Arithmetic(split, size=n)))


def test_loss_is_log2_at_init_and_a_step_prefers_chosen(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    rendered = [dpo.render_pair(tokenizer, p, 127) for p in arithmetic_pairs(8)]
    assert all(r is not None for r in rendered)
    inputs, targets = dpo.pairs_to_batch(rendered, tokenizer.get_bos_token_id())
    n = len(rendered)
    with torch.no_grad():
        ref = dpo.sequence_logps(model, inputs, targets)
    # the precomputed table (other batch sizes, other padding) agrees with the batch
    table = dpo.compute_logps(model, rendered, 3, tokenizer.get_bos_token_id(), "cpu")
    assert torch.allclose(table[:, 0], ref[:n], atol=1e-4) and torch.allclose(table[:, 1], ref[n:], atol=1e-4)
    logps = dpo.sequence_logps(model, inputs, targets)
    losses, rc, rr = dpo.dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-6)
    assert torch.equal(rc, torch.zeros_like(rc)) and torch.equal(rr, torch.zeros_like(rr))
    stats = dpo.mean_stats(dpo.pair_stats(logps[:n].detach(), logps[n:].detach(), ref[:n], ref[n:], 0.1))
    assert stats["reward_acc"] == 0.5 and stats["margin"] == 0.0  # ties count half
    # d loss / d log pi(chosen) = -beta * sigmoid(-margin) = -beta / 2 at the start: descent raises it
    pi_c, pi_r = logps[:n].detach().requires_grad_(), logps[n:].detach().requires_grad_()
    dpo.dpo_loss(pi_c, pi_r, ref[:n], ref[n:], beta=0.1)[0].sum().backward()
    assert torch.allclose(pi_c.grad, torch.full_like(pi_c, -0.05)) and torch.allclose(pi_r.grad, torch.full_like(pi_r, 0.05))
    losses.mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1.0 * p.grad  # one plain SGD step
        after = dpo.sequence_logps(model, inputs, targets)
        new_losses, _, _ = dpo.dpo_loss(after[:n], after[n:], ref[:n], ref[n:], beta=0.1)
    # the chosen replies gained log-prob relative to the rejected ones, and the loss fell below log 2
    assert ((after[:n] - ref[:n]) - (after[n:] - ref[n:])).mean() > 0
    assert new_losses.mean() < math.log(2)


def test_logps_cover_the_final_response_only(tokenizer):
    sp = tokenizer.encode_special
    chosen = {"conversations": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": [{"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"},
                                          {"type": "text", "text": "The answer is 5."}]}]}
    rejected = tasks.common.with_final_text(chosen, "5.", "6.")
    (c_ids, c_mask), (r_ids, r_mask) = dpo.render_pair(tokenizer, {"chosen": chosen, "rejected": rejected}, 200)
    last = max(i for i, t in enumerate(c_ids) if t == sp("<|assistant_start|>"))
    out_start, out_end = c_ids.index(sp("<|output_start|>")), c_ids.index(sp("<|output_end|>"))
    want = [int(i > last and not out_start <= i <= out_end) for i in range(len(c_ids))]
    assert c_mask == want  # not the first reply, not the prompt, not the tool output
    assert c_ids[-1] == sp("<|assistant_end|>") and c_mask[-1] == 1
    # sequence_logps == the sum of log-softmax at exactly those positions
    model = tiny_model(tokenizer.get_vocab_size())
    inputs, targets = dpo.pairs_to_batch([((c_ids, c_mask), (r_ids, r_mask))], tokenizer.get_bos_token_id())
    with torch.no_grad():
        got = dpo.sequence_logps(model, inputs, targets)
        logp = F.log_softmax(model(inputs), dim=-1)
    for row, (ids, mask) in enumerate([(c_ids, c_mask), (r_ids, r_mask)]):
        manual = sum(logp[row, t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t])
        assert abs(got[row].item() - manual) < 1e-3
    # identical sides, or a reply cut off entirely, make no pair
    assert dpo.render_pair(tokenizer, {"chosen": chosen, "rejected": chosen}, 200) is None
    assert dpo.render_pair(tokenizer, {"chosen": chosen, "rejected": rejected}, last - 1) is None


# ----------------------------------------------------------------------------- the script

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    """A base dir with the tokenizer and a tiny checkpoint standing in for an SFT model."""
    base = tmp_path_factory.mktemp("nanochat_dpo")
    tokenizer.save(str(base / "tokenizer"))
    model = tiny_model(tokenizer.get_vocab_size())
    save_checkpoint(str(base / "chatsft_checkpoints" / "t1"), 7, model.state_dict(), None,
                    {"model_config": dict(model.config.__dict__)})
    return base


def run_dpo(base_dir, args, timeout=120):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_REPORT_DIR": str(base_dir / "report"),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_dpo", "--device_type=cpu", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"chat_dpo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


SMALL = ["--device_batch_size=2", "--target_pairs_per_step=4", "--num_iterations=3", "--eval_every=2",
         "--eval_pairs=6", "--multiple_choice_pairs=0", "--arithmetic_pairs=40", "--max_seq_len=127"]


def test_chat_dpo_three_steps_then_resume(base_dir):
    out = run_dpo(base_dir, SMALL + ["--init_lr_frac=0.5"])
    assert "from " + str(base_dir / "chatsft_checkpoints" / "t1") + " step 7" in out
    assert [(int(s), int(t)) for s, t, *_ in STEP_RE.findall(out)] == [(1, 3), (2, 3), (3, 3)]
    evals = EVAL_RE.findall(out)
    assert [int(e[0]) for e in evals] == [0, 2, 3]
    assert abs(float(evals[0][1]) - math.log(2)) < 1e-3 and float(evals[0][3]) == 0.5  # policy == reference
    ckpt = base_dir / "chatdpo_checkpoints" / "t1"
    assert {"model_000003.pt", "meta_000003.json", "optim_000003_rank0.pt", "loss_curve.png"} <= set(os.listdir(ckpt))
    meta = json.loads((ckpt / "meta_000003.json").read_text())
    assert meta["history"]["step"] == [1, 2, 3] and meta["eval"]["all"]["loss"] > 0
    section = json.loads((base_dir / "report" / "sections" / "chat-dpo.json").read_text())
    assert section["stage"] == "DPO" and "pref acc" in section["summary"]

    out = run_dpo(base_dir, SMALL + ["--init_lr_frac=0.5", "--num_iterations=5", "--resume"])
    assert f"resumed from {ckpt} step 3" in out
    assert [int(s) for s, *_ in STEP_RE.findall(out)] == [4, 5]
    assert "model_000005.pt" in os.listdir(ckpt)


def test_chat_dpo_user_pairs_with_lora_and_live_reference(base_dir, tmp_path):
    path = tmp_path / "prefs.jsonl"
    lines = [{"prompt": f"What is {i} plus {i}?", "chosen": f"The answer is {2 * i}.", "rejected": f"The answer is {2 * i + 1}."}
             for i in range(60)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    out = run_dpo(base_dir, SMALL + [f"--data_path={path}", "--model_tag=lora", "--lora_rank=4", "--lora_alpha=8",
                                     "--precompute_ref=False", "--lora_lr=0.01"])
    assert "LoRA: training" in out and "adapters off for the train batches" in out
    assert [int(s) for s, *_ in STEP_RE.findall(out)] == [1, 2, 3]
    m = re.search(r"pairs: train (\d+) \| held-out (\d+) \(user (\d+)\)", out)
    assert m and int(m.group(1)) == 3 * 4 and 1 <= int(m.group(2)) < 60  # the run uses steps x pairs per step
    ckpt = base_dir / "chatdpo_checkpoints" / "lora"
    adapter = ckpt / "adapter_000003.pt"
    assert adapter.exists() and adapter.stat().st_size < (ckpt / "model_000003.pt").stat().st_size
    # bad input names the file and line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "y"}\n', encoding="utf-8")
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_REPORT_DIR": str(base_dir / "report")}
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_dpo", "--device_type=cpu", f"--data_path={bad}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"{bad}: line 1: field 'rejected' is missing" in proc.stdout + proc.stderr


def test_minimind_dpo_jsonl_cleans_then_trains(base_dir, tmp_path):
    """MiniMind's dpo.jsonl as it is (chosen / rejected message lists, some with earlier turns),
    through the cleaning pass, then two steps of chat_dpo on the cleaned file."""
    def pair(i):
        history = [{"role": "user", "content": "Let's do sums."}, {"role": "assistant", "content": "Sure."}] if i % 3 == 0 else []
        shared = history + [{"role": "user", "content": f"What is {i} plus {i}?"}]
        return {"chosen": shared + [{"role": "assistant", "content": f"The answer is {2 * i}."}],
                "rejected": json.loads(json.dumps(shared)) + [{"role": "assistant", "content": f"The answer is {2 * i + 1}."}]}
    rows = [pair(i) for i in range(40)]
    rows[5]["rejected"][-2]["content"] = "What is 5 plus 6?"  # the prompts differ: dropped, named
    path = tmp_path / "dpo.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "nanochat.clean_data", "--kind=dpo", str(path), "--workers=1", "--max_tokens=127",
                    f"--tokenizer_dir={base_dir / 'tokenizer'}"], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "NANOCHAT_REPORT_DIR": str(base_dir / "report")})
    cleaned = tmp_path / "dpo.clean.jsonl"
    report = json.loads((tmp_path / "dpo.clean.report.json").read_text())
    assert report["kept"] == 39 and report["removed"] == {"prompt_mismatch": 1} and report["first_lines"]["prompt_mismatch"] == [6]
    out = run_dpo(base_dir, SMALL + [f"--data_path={cleaned}", "--model_tag=minimind", "--num_iterations=2"])
    assert [int(s) for s, *_ in STEP_RE.findall(out)] == [1, 2]
    stats = json.loads((base_dir / "chatdpo_checkpoints" / "minimind" / "dataset_stats.json").read_text())
    assert stats["PreferencePairs"]["documents"] == 39 and stats["PreferencePairs"]["cleaning"]["removed"] == {"prompt_mismatch": 1}
