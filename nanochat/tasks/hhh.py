"""
Preference pairs from BIG-bench's hhh_alignment task (harmless / helpful / honest / other:
221 prompts, each with a preferred reply (target score 1) and a worse one (0)), read out of
the pinned bigbench 1.0.0 sdist (Apache-2.0; 342 MB, the same pin as nanochat.dataset's
opt-in `bigbench` source; one pass over the tar takes ~20 s). Small: best kept for
evaluating DPO (held-out preference accuracy); 1 in 5 prompts is the test split.
get(i) -> {"prompt", "chosen", "rejected"} with whole conversations, as PreferencePairs.
"""
import functools
import json

from nanochat.dataset import read_members
from nanochat.tasks.common import Task, check_split, is_test_item, package_archive

SUBSETS = ("harmless", "helpful", "honest", "other")


@functools.lru_cache(maxsize=1)
def load_pairs(archive: str) -> tuple:
    """-> ((subset, prompt, chosen, rejected), ...): each preferred reply against each worse one."""
    members = {f"bigbench-1.0.0/bigbench/benchmark_tasks/hhh_alignment/{s}/task.json": s for s in SUBSETS}
    data = read_members(archive, list(members))
    out = []
    for member, subset in members.items():
        for example in json.loads(data[member])["examples"]:
            scores = example["target_scores"]
            for chosen in (r for r, s in scores.items() if s == 1):
                out += [(subset, example["input"], chosen, r) for r, s in scores.items() if s == 0]
    return tuple(out)


class HHHAlignment(Task):
    """BIG-bench HHH preference pairs (opt-in: needs the large bigbench archive)."""

    def __init__(self, split: str = "test", **slice_args):
        super().__init__(**slice_args)
        check_split("HHHAlignment", split)
        self.pairs = [p for p in load_pairs(package_archive("bigbench"))
                      if is_test_item(p[1], every=5) == (split == "test")]

    def num_examples(self):
        return len(self.pairs)

    def get_example(self, index):
        _, prompt, chosen, rejected = self.pairs[index]
        def conversation(reply):
            return {"conversations": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}
        return {"prompt": prompt, "chosen": conversation(chosen), "rejected": conversation(rejected)}
