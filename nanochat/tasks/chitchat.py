"""
Human small-talk chats from chitchat-dataset 0.9.0 (MIT; 7,168 chats, 258k messages, 8 MB
wheel holding `chitchat_dataset/dataset.json`), fetched as a pinned data carrier with
fetch_package_archive and read out of the zip.

A chat is a list of turns, each a list of messages from one sender. The first sender is the
user, the other the assistant; consecutive turns of the same sender are merged and the
messages of a turn joined by newlines; a trailing user turn is dropped. A chat is cut before
the first user question about who the other is (humans exchange names there, which would
contradict the Identity task), then into pieces of at most MAX_MESSAGES messages, each with at
least one user/assistant exchange. A chat's pieces belong to the test split iff
common.is_test_item(chat id, every=20).
"""
import functools
import json
import re
import zipfile

from nanochat.tasks.common import Task, check_split, is_test_item, package_archive

MEMBER = "chitchat_dataset/dataset.json"
MAX_MESSAGES = 16  # a longer chat is cut into pieces of this many messages (an even number)
IDENTITY_QUESTION = re.compile(r"\b(who are you|your name|are you (a )?(bot|human|robot))\b", re.I)


@functools.lru_cache(maxsize=2)
def load_chats(archive: str) -> tuple[tuple[str, tuple], ...]:
    """-> (("chat_id/first message", ((role, text), ...)), ...) in the file's order."""
    with zipfile.ZipFile(archive) as z:
        chats = json.loads(z.read(MEMBER))
    out = []
    for chat_id, chat in chats.items():
        turns = []  # [sender, text] with consecutive same-sender turns merged
        for turn in chat["messages"]:
            texts = [m["text"].strip() for m in turn if m.get("text", "").strip()]
            if not texts:
                continue
            sender = turn[0]["sender"]
            if turns and turns[-1][0] == sender:
                turns[-1][1] += "\n" + "\n".join(texts)
            else:
                turns.append([sender, "\n".join(texts)])
        if len(turns) % 2:
            turns.pop()  # end on the assistant
        if len(turns) < 2:
            continue
        messages = tuple(("user" if i % 2 == 0 else "assistant", text) for i, (_, text) in enumerate(turns))
        for i, (role, text) in enumerate(messages):
            if role == "user" and IDENTITY_QUESTION.search(text):
                messages = messages[:i]  # keep what came before the names were exchanged
                break
        for start in range(0, len(messages), MAX_MESSAGES):  # long chats -> several conversations
            if len(messages[start:start + MAX_MESSAGES]) >= 2:
                out.append((f"{chat_id}/{start}", messages[start:start + MAX_MESSAGES]))
    return tuple(out)


class ChitChat(Task):
    """Multi-turn human chats as user/assistant conversations (not evaluable)."""

    def __init__(self, split: str = "train", **slice_args):
        super().__init__(**slice_args)
        check_split("ChitChat", split)
        self.split = split
        self.chats = [messages for chat_id, messages in load_chats(package_archive("chitchat"))
                      if is_test_item(chat_id.split("/")[0], every=20) == (split == "test")]

    def num_examples(self):
        return len(self.chats)

    def get_example(self, index):
        return {"conversations": [{"role": role, "content": text} for role, text in self.chats[index]]}
