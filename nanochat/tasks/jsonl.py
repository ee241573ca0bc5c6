"""
User data from JSONL files (the MiniMind format of DESIGN.md), checked line by line.

JSONLConversations(path): one conversation per line, {"conversations": [...]} or
{"messages": [...]}; messages {"role": "system"|"user"|"assistant", "content": ...}, an optional
system message first, then user and assistant alternating (user first), at least one assistant
reply. Content is a non-empty string; an assistant's may also be a list of parts
{"type": "text"|"python"|"python_output", "text": str}.
PreferencePairs(path): {"prompt": str, "chosen": str, "rejected": str} per line (for DPO);
get(i) -> {"prompt", "chosen", "rejected"} where chosen / rejected are whole conversations
(the prompt as the user message, the reply as the assistant's).

Blank lines are skipped. Any other bad line raises DataError naming the file, the line and the
field, e.g. `data.jsonl: line 3: field 'conversations[1].role': ...`.
"""

from nanochat.common import DataError, read_jsonl
from nanochat.tasks.common import Task

PART_TYPES = ("text", "python", "python_output")


def check_conversation(obj: dict, where: str) -> dict:
    """Validate one MiniMind record -> {"conversations": messages}. `where` is 'file: line N'."""
    key = "conversations" if "conversations" in obj else "messages" if "messages" in obj else None
    if key is None:
        raise DataError(f"{where}: field 'conversations' (or 'messages') is missing; keys: {sorted(obj)}")
    messages = obj[key]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of messages")
    turn = 0  # index among the user/assistant messages
    for i, msg in enumerate(messages):
        field = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(f"{where}: field '{field}' must be an object with 'role' and 'content'")
        for name in ("role", "content"):
            if name not in msg:
                raise DataError(f"{where}: field '{field}.{name}' is missing")
        role, content = msg["role"], msg["content"]
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: field '{field}.role': unknown role {role!r} (expected system, user or assistant)")
        if role == "system":
            if i != 0:
                raise DataError(f"{where}: field '{field}.role': a system message may only come first")
        else:
            expected = "user" if turn % 2 == 0 else "assistant"
            if role != expected:
                raise DataError(f"{where}: field '{field}.role': {role!r} out of order, expected {expected!r} "
                                f"(user and assistant alternate, user first)")
            turn += 1
        if isinstance(content, list) and role == "assistant":
            if not content:
                raise DataError(f"{where}: field '{field}.content': empty list of parts")
            for j, part in enumerate(content):
                pfield = f"{field}.content[{j}]"
                if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
                    raise DataError(f"{where}: field '{pfield}.type' must be one of {', '.join(PART_TYPES)}")
                if not isinstance(part.get("text"), str):
                    raise DataError(f"{where}: field '{pfield}.text' must be a string")
        elif not isinstance(content, str):
            raise DataError(f"{where}: field '{field}.content' must be a string, got {type(content).__name__}")
        elif not content.strip():
            raise DataError(f"{where}: field '{field}.content' is empty")
    if turn < 2:
        raise DataError(f"{where}: field '{key}': needs a user message followed by an assistant reply")
    return {"conversations": messages}


class JSONLConversations(Task):
    """Conversations from a user's JSONL file, all validated when loaded."""

    def __init__(self, path: str, **slice_args):
        super().__init__(**slice_args)
        self.path = path
        self.conversations = [check_conversation(obj, f"{path}: line {lineno}") for lineno, obj in read_jsonl(path)]

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]


class PreferencePairs(Task):
    """{"prompt", "chosen", "rejected"} lines for DPO, all validated when loaded."""

    def __init__(self, path: str, **slice_args):
        super().__init__(**slice_args)
        self.path = path
        self.pairs = []
        for lineno, obj in read_jsonl(path):
            for name in ("prompt", "chosen", "rejected"):
                if name not in obj:
                    raise DataError(f"{path}: line {lineno}: field '{name}' is missing")
                if not isinstance(obj[name], str) or not obj[name].strip():
                    raise DataError(f"{path}: line {lineno}: field '{name}' must be a non-empty string")
            self.pairs.append((obj["prompt"], obj["chosen"], obj["rejected"]))

    def num_examples(self):
        return len(self.pairs)

    def get_example(self, index):
        prompt, chosen, rejected = self.pairs[index]
        def conversation(reply):
            return {"conversations": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}
        return {"prompt": prompt, "chosen": conversation(chosen), "rejected": conversation(rejected)}
