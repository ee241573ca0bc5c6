"""
The cleaning pass (nanochat/clean_data.py) and the formats it reads (nanochat/records.py): a
MiniMind-format SFT file with one planted defect per reason at known lines, counted exactly
(in one process and in a pool over many small chunks, with the same output); --strict; files that
are not UTF-8, not JSONL or empty after cleaning; pretraining rows into nanochat.dataset; MiniMind's
DPO message lists; reasoning markup; the offset-indexed tasks against the in-memory reading.
Run: nice -n 10 python -m pytest tests/test_clean_data.py -q
"""
import json
import os
import random
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from nanochat import clean_data, dataset
from nanochat.common import DataError, read_jsonl
from nanochat.records import check_conversation, check_preference_pair
from nanochat.tasks import JSONLConversations, PreferencePairs, TaskMixture
from nanochat.tokenizer import RustBPETokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("river stone lamp garden window orange violet thunder paper castle quiet engine silver forest "
         "bridge candle mirror harbor pencil rocket saddle tunnel velvet walnut yellow zebra anchor basket "
         "cotton desert falcon glacier hammer island jungle kettle ladder meadow needle orchard pepper").split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chinese(rng, n):
    return "".join(chr(rng.randrange(0x4E00, 0x4E00 + 2000)) for _ in range(n))


def good_conversation(rng, i):
    """MiniMind's SFT rows: English or Chinese, some with a system message, some two turns long."""
    text = chinese if i % 4 == 0 else sentence
    messages = [{"role": "user", "content": text(rng, 8)}, {"role": "assistant", "content": text(rng, 12)}]
    if i % 5 == 1:
        messages.insert(0, {"role": "system", "content": "你是一个乐于助人的助手。" if i % 4 == 0 else "You are helpful."})
    if i % 7 == 2:
        messages += [{"role": "user", "content": text(rng, 5)}, {"role": "assistant", "content": text(rng, 6)}]
    return {"conversations": messages}


def conv(*turns, key="conversations"):
    return {key: [{"role": r, "content": c} for r, c in turns]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    rng = random.Random(0)
    texts = [sentence(rng, 200) for _ in range(20)] + [chinese(rng, 300) for _ in range(5)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    RustBPETokenizer.train_from_iterator(texts, 512).save(str(path))
    return str(path)


def planted_sft_file(path):
    """60 good rows with a defect of each reason at a known line, plus blank lines. Returns
    ({reason: line}, good rows in order)."""
    rng = random.Random(1)
    good = [good_conversation(rng, i) for i in range(60)]
    long_row = conv(("user", sentence(rng, 10)), ("assistant", sentence(rng, 80)))
    good[20] = long_row
    near = json.loads(json.dumps(long_row))
    near["conversations"][1]["content"] = near["conversations"][1]["content"].replace(" ", " zebra ", 1)
    whitespace_copy = json.loads(json.dumps(good[3]))
    whitespace_copy["conversations"][1]["content"] = "  " + whitespace_copy["conversations"][1]["content"].replace(" ", "\n ")
    defects = [  # (reason, line content): each goes in after good row 2 * k + 5
        ("not_utf8", b'{"conversations": [{"role": "user", "content": "caf\xe9"}]}'),
        ("malformed_json", b'{"conversations": [{"role": "user", "content": "hi"'),
        ("not_an_object", b'["user", "hi"]'),
        ("missing_field", {"text": "a pretraining row in the SFT file"}),
        ("wrong_type", {"conversations": "hello there"}),
        ("unknown_role", conv(("user", "hi"), ("bot", "hello"))),
        ("bad_turn_order", conv(("user", "hi"), ("user", "hello?"))),
        ("empty_content", conv(("user", "hi"), ("assistant", "   "))),
        ("no_assistant_reply", conv(("user", "anyone there?"))),
        ("bad_think_tags", conv(("user", "2+2?"), ("assistant", "<think>two and two"))),
        ("garbage_text", conv(("user", "Ã©Ã¨Ã Ã¢Ã®Ã´Ã»Ã§ Ã©Ã¨"), ("assistant", "Ã¢Ã®Ã´Ã»Ã§Ã©Ã¨Ã Ã¢Ã®"))),
        ("too_long", conv(("user", "tell me everything"), ("assistant", sentence(rng, 600)))),
        ("duplicate", whitespace_copy),
        ("near_duplicate", near),
    ]
    lines, where = [], {}
    slots = {2 * k + 25: d for k, d in enumerate(defects)}  # after row 20 (the long one) and row 3
    for i, row in enumerate(good):
        if i % 9 == 4:
            lines.append(b"   ")  # blank lines are skipped, never counted
        lines.append(json.dumps(row, ensure_ascii=i % 2 == 0).encode("utf-8"))
        if i in slots:
            reason, content = slots[i]
            lines.append(content if isinstance(content, bytes) else json.dumps(content, ensure_ascii=False).encode())
            where[reason] = len(lines)
    path.write_bytes(b"\n".join(lines) + b"\r\n")
    return where, good


def run_clean(*args):
    clean_data.main([str(a) for a in args])


def read_report(out):
    with open(clean_data.report_path(str(out)), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("workers", [1, 2])
def test_each_planted_defect_is_counted_exactly(tmp_path, tokenizer_dir, workers):
    src = tmp_path / "sft_mini_512.jsonl"
    where, good = planted_sft_file(src)
    out = tmp_path / "clean.jsonl"
    # chunks of 2 KB: the file is cut into many pieces, line numbers must still be exact
    run_clean(src, "--kind=sft", f"--out={out}", "--max_tokens=400", f"--tokenizer_dir={tokenizer_dir}", "--near_dup",
              f"--workers={workers}", "--chunk_mb=0.002")
    report = read_report(out)
    assert report["removed"] == {reason: 1 for reason in where}
    assert report["first_lines"] == {reason: [line] for reason, line in where.items()}
    assert report["kept"] == len(good) == report["lines"] - report["blank_lines"] - len(where)
    assert report["removed"].keys() <= set(report["examples"])
    assert "line %d: field 'conversations[1].role': unknown role 'bot'" % where["unknown_role"] in report["examples"]["unknown_role"]
    kept = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert kept == good  # every good row, in the input's order, as it was
    length = report["length"]
    assert length["unit"] == "tokens" and length["measured_rows"] == len(good) and 0 < length["p50"] <= length["max"] <= 400
    assert report["language"]["rows_mostly_cjk"] == sum(1 for i in range(60) if i % 4 == 0 and i != 20)
    assert os.path.getsize(tmp_path / "clean.lengths.png") > 1000
    assert clean_data.cleaning_summary(str(out))["kept"] == len(good)
    sections = os.listdir(os.path.join(os.environ["NANOCHAT_REPORT_DIR"], "sections"))
    assert "data-cleaning-sft-mini-512-jsonl.json" in sections


def test_strict_stops_at_the_first_defect_naming_file_line_field(tmp_path, tokenizer_dir):
    src = tmp_path / "sft.jsonl"
    rows = [json.dumps(conv(("user", "hi"), ("assistant", f"hello {i}"))) for i in range(5)]
    rows[3] = json.dumps(conv(("user", "hi"), ("assistant", "hello 0")))  # a duplicate: not an error, dropped
    rows.insert(4, json.dumps(conv(("user", "hi"), ("assistant", ""))))
    rows.append(json.dumps(conv(("user", "hi"), ("robot", "x"))))
    src.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as e:
        run_clean(src, "--kind=sft", "--strict", f"--tokenizer_dir={tokenizer_dir}", "--workers=2", "--chunk_mb=0.0001")
    assert str(e.value) == f"{src}: line 5: field 'conversations[1].content' is empty"
    assert not (tmp_path / "sft.clean.jsonl").exists() and os.listdir(tmp_path) == ["sft.jsonl"]
    proc = subprocess.run([sys.executable, "-m", "nanochat.clean_data", "--kind=sft", "--strict", "--workers=1",
                           f"--tokenizer_dir={tokenizer_dir}", str(src)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {src}: line 5: field 'conversations[1].content' is empty"


@pytest.mark.parametrize("content,words", [
    ("你好，世界\n".encode("gbk") * 30, ["not UTF-8 text", "30 of the first 30 lines", "iconv"]),
    (json.dumps([{"text": "a"}, {"text": "b"}], indent=2).encode(), ["not JSONL", "jq"]),
    (b'{"text": "only"}\n' + b'not json at all\n' * 5, ["not JSONL", "5 of the first 6 lines"]),
    (b'{"txt": "a"}\n{"text": ""}\n{"text": 3}\n', ["nothing left after cleaning", "missing_field 1", "empty_content 1",
                                                     "wrong_type 1"]),
    (b"\n  \n", ["empty file"]),
])
def test_bad_files_are_errors_not_empty_runs(tmp_path, content, words):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    with pytest.raises(DataError) as e:
        run_clean(src, "--kind=pretrain", "--workers=1")
    assert all(w in str(e.value) for w in words), str(e.value)
    assert os.listdir(tmp_path) == ["in.jsonl"]  # nothing written, not even a temp file


def test_no_tokenizer_says_so_and_skips_the_length_check(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    src = tmp_path / "sft.jsonl"
    src.write_text(json.dumps(conv(("user", "hi"), ("assistant", "x" * 5000))) + "\n")
    run_clean(src, "--kind=sft", "--workers=1")
    assert "the --max_tokens=2048 length check is SKIPPED" in capsys.readouterr().out
    report = read_report(tmp_path / "sft.clean.jsonl")
    assert report["kept"] == 1 and report["length"]["unit"] == "characters" and "SKIPPED" in report["length"]["note"]


def test_pretrain_rows_clean_then_build_and_stats_carry_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    rng = random.Random(2)
    docs = [sentence(rng, 30) if i % 3 else chinese(rng, 60) for i in range(200)]
    lines = [json.dumps({"text": d, "id": i}, ensure_ascii=False) for i, d in enumerate(docs)]
    lines[10:10] = ['{"text": ""}', '{"text": null}', '{"body": "x"}', json.dumps({"text": docs[0] + "  "}), "{oops"]
    src = tmp_path / "pretrain_hq.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run_clean(src, "--kind=pretrain", "--workers=2", "--chunk_mb=0.001")
    out = tmp_path / "pretrain_hq.clean.jsonl"
    report = read_report(out)
    assert report["kept"] == 200 and report["removed"] == {"empty_content": 1, "wrong_type": 1, "missing_field": 1,
                                                           "duplicate": 1, "malformed_json": 1}
    assert report["length"]["unit"] == "characters"  # no tokenizer in this base dir: characters, said so
    assert 0.1 < report["language"]["cjk_share"] < 0.2 and report["language"]["rows_mostly_cjk"] == 67
    dataset.main([f"--input={out}"])
    data_dir = tmp_path / "base" / "base_data"
    texts = [t for f in sorted(os.listdir(data_dir)) if f.endswith(".parquet")
             for t in pq.read_table(data_dir / f).column("text").to_pylist()]
    assert sorted(texts) == sorted(docs)  # every good document, once
    stats = json.loads((data_dir / "dataset_stats.json").read_text())
    cleaning = stats["pretrain_hq.clean.jsonl"]["cleaning"]
    assert cleaning["kept"] == 200 and cleaning["removed"]["duplicate"] == 1 and cleaning["report"].endswith(".report.json")


# ----------------------------------------------------------------------------- DPO and reasoning

def minimind_pair(prompt, good, bad, history=()):
    def side(reply):
        return [{"role": r, "content": c} for r, c in [*history, ("user", prompt), ("assistant", reply)]]
    return {"chosen": side(good), "rejected": side(bad)}


def test_dpo_both_formats_and_shared_turns_checked(tmp_path, tokenizer_dir):
    rows = [minimind_pair("what is 2+2?", "4", "5"),
            {"prompt": "capital of France?", "chosen": "Paris", "rejected": "Rome"},
            minimind_pair("and then?", "then 5", "then 6", history=[("user", "count"), ("assistant", "1 2 3 4")])]
    mismatch = minimind_pair("q", "a", "b")
    mismatch["rejected"][0]["content"] = "another q"
    same = minimind_pair("q2", "same", "same")
    src = tmp_path / "dpo.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows + [mismatch, same]) + "\n")
    run_clean(src, "--kind=dpo", f"--tokenizer_dir={tokenizer_dir}", "--workers=1")
    report = read_report(tmp_path / "dpo.clean.jsonl")
    assert report["kept"] == 3 and report["removed"] == {"prompt_mismatch": 1, "identical_pair": 1}
    assert report["first_lines"] == {"prompt_mismatch": [4], "identical_pair": [5]}
    assert "field 'rejected[0].content' differs from 'chosen[0].content'" in report["examples"]["prompt_mismatch"]
    pairs = PreferencePairs(str(tmp_path / "dpo.clean.jsonl"))
    assert pairs.cleaning["kept"] == 3 and len(pairs) == 3
    assert [p["prompt"] for p in pairs] == ["what is 2+2?", "capital of France?", "and then?"]
    third = pairs.get(2)
    assert third["chosen"]["conversations"][:3] == third["rejected"]["conversations"][:3]
    assert [m["content"] for m in (third["chosen"]["conversations"][-1], third["rejected"]["conversations"][-1])] == \
        ["then 5", "then 6"]
    with pytest.raises(DataError) as e:  # an uncleaned file is checked when it is opened
        PreferencePairs(str(src))
    assert str(e.value).startswith(f"{src}: line 4: field 'rejected[0].content' differs")
    for bad, message in [({"chosen": [], "rejected": []}, "field 'chosen' must be a non-empty list"),
                         (dict(minimind_pair("q", "a", "b"), prompt="q"), "field 'prompt'"),
                         ({"chosen": [{"role": "user", "content": "q"}], "rejected": "b"}, "field 'chosen'")]:
        with pytest.raises(DataError, match=message):
            check_preference_pair(bad, "x.jsonl: line 1")


def test_reasoning_markup_maps_onto_think_tokens(tmp_path, tokenizer_dir):
    r1 = conv(("user", "1+1?"), ("assistant", "<think>\none and one\n</think>\n<answer>\n2\n</answer>"))
    no_open = conv(("user", "2+2?"), ("assistant", "two and two</think>4"))
    plain = conv(("user", "hi"), ("assistant", "hello"))
    unclosed = conv(("user", "3+3?"), ("assistant", "<think>three and three"))
    src = tmp_path / "r1_mix_1024.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [r1, no_open, plain, unclosed]) + "\n")
    run_clean(src, "--kind=reasoning", f"--tokenizer_dir={tokenizer_dir}", "--workers=1")
    out = tmp_path / "r1_mix_1024.clean.jsonl"
    report = read_report(out)
    assert report["removed"] == {"no_think": 1, "bad_think_tags": 1} and report["first_lines"]["no_think"] == [3]
    replies = [json.loads(line)["conversations"][1]["content"] for line in out.read_text().splitlines()]
    assert replies == ["<think>one and one</think>2", "<think>two and two</think>4"]
    tokenizer = RustBPETokenizer.from_directory(tokenizer_dir)
    ids, mask = tokenizer.render_conversation(JSONLConversations(str(out)).get(0))
    think, end = tokenizer.encode_special("<think>"), tokenizer.encode_special("</think>")
    assert ids.count(think) == ids.count(end) == 1 and mask[ids.index(think)] == 1  # special tokens, trained on
    run_clean(src, "--kind=sft", f"--tokenizer_dir={tokenizer_dir}", "--workers=1", f"--out={tmp_path / 'sft.jsonl'}")
    assert read_report(tmp_path / "sft.jsonl")["kept"] == 3  # sft maps the markup too, and keeps rows without it


# ----------------------------------------------------------------------------- reading from disk by offset

def test_offset_task_equals_in_memory_reading(tmp_path):
    rng = random.Random(3)
    rows = [good_conversation(rng, i) for i in range(50)]
    rows[7] = conv(("user", "hi"), ("assistant", "hello"), key="messages")
    src = tmp_path / "convs.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=i % 2 == 0) + ("\n\n" if i % 6 == 0 else "\n")
                           for i, r in enumerate(rows)), encoding="utf-8")
    task = JSONLConversations(str(src))
    expected = [check_conversation(obj, "x") for _, obj in read_jsonl(str(src))]
    assert len(task) == 50 and [task.get(i) for i in range(50)] == expected
    assert task.offsets.itemsize == 8 and task.cleaning is None
    # the mixture's shuffled order is the one the list of (task, index) pairs had
    other = TaskMixture([task, task], seed=5)
    old_index = [(t, i) for t in range(2) for i in range(50)]
    random.Random(5).shuffle(old_index)
    assert [other.get(k) for k in range(100)] == [task.get(i) for _, i in old_index]


def test_a_bad_row_found_at_read_time_names_file_and_line(tmp_path):
    src = tmp_path / "convs.jsonl"
    good = json.dumps(conv(("user", "hi"), ("assistant", "hello")))
    src.write_text(good + "\n\n" + good + "\n" + json.dumps(conv(("user", "hi"), ("bot", "x"))) + "\n")
    task = JSONLConversations(str(src), validate=False)  # as for a cleaned file: indexed, not parsed
    assert len(task) == 3 and task.get(1) == json.loads(good)
    with pytest.raises(DataError) as e:
        task.get(2)
    assert str(e.value).startswith(f"{src}: line 4: field 'conversations[1].role': unknown role 'bot'")
    with pytest.raises(DataError, match="line 4: field 'conversations\\[1\\].role'"):
        JSONLConversations(str(src))  # validated when opened: the run stops before training
    with open(src, "a") as f:
        f.write(good + "\n")
    with pytest.raises(DataError, match="changed since it was opened"):
        task.get(0)
