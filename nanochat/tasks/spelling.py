"""
Spelling and letter counting (English and Chinese prompts) over a real word list.

Words: `reasoning_gym/data/words3to10.txt` of the pinned reasoning-gym 0.1.25 wheel
(Apache-2.0, 7 MB; 151k words, of which the all-lowercase ASCII ones are used), fetched as a
data carrier with fetch_package_archive and read out of the zip. A word belongs to the test
split iff common.is_test_item(word). Two kinds of example:
  - count: "How many 'r' are in strawberry?" -> python tool call `print('strawberry'.count('r'))`
    (run in the sandbox: the calculator refuses print), its output, then "The answer is 3."
    (evaluate: the last number of the completion)
  - spell: "Spell the word strawberry" -> "strawberry is spelled s-t-r-a-w-b-e-r-r-y."
    (evaluate: the last run of single letters joined by '-' spells the word)
"""
import functools
import random
import re
import zipfile

from nanochat.tasks.common import Task, check_split, is_test_item, last_number, package_archive, with_final_text

WORDS_MEMBER = "reasoning_gym/data/words3to10.txt"
COUNT_EN = ["How many '{c}' are in {w}?", "How many times does the letter {c} appear in \"{w}\"?",
            "Count the letter '{c}' in the word {w}.", "How many {c}'s are there in {w}?",
            "In the word '{w}', how many times does '{c}' occur?"]
COUNT_ZH = ["{w} 这个单词里有几个字母 {c}？", "单词 \"{w}\" 中有多少个 '{c}'？", "数一数 {w} 里字母 {c} 出现了几次。"]
SPELL_EN = ["Spell the word {w}", "How do you spell {w}?", "Can you spell \"{w}\" letter by letter?",
            "Spell {w} for me, please."]
SPELL_ZH = ["请拼写单词 {w}。", "{w} 怎么拼？", "把单词 {w} 一个字母一个字母地拼出来。"]


@functools.lru_cache(maxsize=2)
def load_words(archive: str) -> tuple[str, ...]:
    with zipfile.ZipFile(archive) as z:
        lines = z.read(WORDS_MEMBER).decode("utf-8").split("\n")
    words = sorted({w.strip() for w in lines if w.strip().isascii() and w.strip().isalpha() and w.strip().islower()})
    if not words:
        raise ValueError(f"{archive}: {WORDS_MEMBER} holds no lowercase words")
    return tuple(words)


class Spelling(Task):
    """Letter counting (with the tool) and spelling; `words` overrides the word list (tests)."""

    def __init__(self, split: str = "train", size: int | None = None, words=None, **slice_args):
        super().__init__(**slice_args)
        check_split("Spelling", split)
        self.split = split
        self.size = size if size is not None else (20_000 if split == "train" else 500)
        words = load_words(package_archive("reasoning_gym")) if words is None else words
        self.words = [w for w in words if is_test_item(w) == (split == "test")]
        if not self.words:
            raise ValueError(f"Spelling: no {split} words in the word list")

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(f"spelling-{self.split}-{index}")
        word = rng.choice(self.words)
        zh = rng.random() < 0.25
        if rng.random() < 0.6:  # count a letter; mostly one that occurs, sometimes one that doesn't
            letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
            answer = str(word.count(letter))
            question = rng.choice(COUNT_ZH if zh else COUNT_EN).format(c=letter, w=word)
            intro = f"我用工具数一下 '{word}' 里的 '{letter}'。" if zh else f"Let me count the '{letter}' in '{word}'."
            final = f"答案是 {answer}。" if zh else f"The answer is {answer}."
            content = [{"type": "text", "text": intro},
                       {"type": "python", "text": f"print('{word}'.count('{letter}'))"},
                       {"type": "python_output", "text": answer},
                       {"type": "text", "text": final}]
            kind = "count"
        else:
            answer = word
            question = rng.choice(SPELL_ZH if zh else SPELL_EN).format(w=word)
            spelled = "-".join(word)
            content = f"{word} 的拼写是：{spelled}。" if zh else f"{word} is spelled {spelled}."
            kind = "spell"
        return {"conversations": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": content}],
                "answer": answer, "kind": kind}

    def evaluate(self, conversation, completion):
        if conversation.get("kind") == "spell":
            runs = re.findall(r"[A-Za-z](?:-[A-Za-z])+", completion)
            return bool(runs) and runs[-1].replace("-", "").lower() == conversation["answer"]
        return last_number(completion) == conversation["answer"]

    def wrong_answer(self, conversation, rng):
        """The gold conversation with a wrong count, or a word spelled with two letters swapped."""
        answer = conversation["answer"]
        if conversation.get("kind") == "spell":
            i = next((i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]), None)
            letters = list(answer)
            if i is None:  # no two different neighbours ("aaa"): drop a letter
                del letters[0]
            else:
                letters[i], letters[i + 1] = letters[i + 1], letters[i]
            return with_final_text(conversation, "-".join(answer), "-".join(letters))
        wrong = str(int(answer) + rng.choice([1, 2] if answer == "0" else [-1, 1, 2]))
        return with_final_text(conversation, f" {answer}", f" {wrong}")
