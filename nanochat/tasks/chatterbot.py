"""
Short English and Chinese Q/A conversations from chatterbot-corpus 1.3.3 (BSD-3-Clause;
0.35 MB wheel, `chatterbot_corpus/data/{english,chinese}/*.yml`), fetched as a pinned data
carrier with fetch_package_archive and read out of the zip.

Each YAML file holds `conversations:`, a list of lists of lines that alternate speaker:
they become user/assistant messages (a trailing user line is dropped). Skipped: botprofile.yml
and conversations whose user asks who the bot is (the corpus bot calls itself other names,
which would contradict the Identity task). A conversation belongs to the test split iff
common.is_test_item(file + first line).
The YAML is parsed with PyYAML (installed with wandb, a project dependency).
"""
import functools
import re
import zipfile

from nanochat.tasks.common import Task, check_split, is_test_item, package_archive

LANGUAGES = ("english", "chinese")
SKIP_FILES = ("botprofile.yml",)
IDENTITY_QUESTION = re.compile(r"who are you|your name|what are you|are you (a )?(bot|human|robot)|"
                               r"你是谁|你叫什么|你的名字|你是什么", re.I)


@functools.lru_cache(maxsize=2)
def load_conversations(archive: str, languages: tuple = LANGUAGES) -> tuple:
    """-> ((key, (line, line, ...)), ...) with an even number of lines each."""
    import yaml
    out = []
    with zipfile.ZipFile(archive) as z:
        for name in sorted(z.namelist()):
            parts = name.split("/")
            if len(parts) != 4 or parts[2] not in languages or not name.endswith(".yml") or parts[3] in SKIP_FILES:
                continue
            try:
                data = yaml.load(z.read(name).decode("utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            except yaml.YAMLError as e:
                raise ValueError(f"{archive}: {name}: bad YAML ({e})") from None
            for lines in (data or {}).get("conversations") or []:
                lines = [str(line).strip() for line in lines if line is not None and str(line).strip()]
                lines = lines[:len(lines) // 2 * 2]
                if lines and not IDENTITY_QUESTION.search(lines[0]):
                    out.append((f"{name}:{lines[0]}", tuple(lines)))
    return tuple(out)


class ChatterbotCorpus(Task):
    """Short Q/A conversations in English and Chinese (not evaluable)."""

    def __init__(self, split: str = "train", languages=LANGUAGES, **slice_args):
        super().__init__(**slice_args)
        check_split("ChatterbotCorpus", split)
        self.split = split
        self.conversations = [lines for key, lines in load_conversations(package_archive("chatterbot"), tuple(languages))
                              if is_test_item(key) == (split == "test")]

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        lines = self.conversations[index]
        return {"conversations": [{"role": "user" if i % 2 == 0 else "assistant", "content": line}
                                  for i, line in enumerate(lines)]}
