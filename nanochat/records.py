"""
The JSONL records users bring (MiniMind's formats), one validator per kind. Each takes a parsed
JSON object and `where` ('file: line N') and returns the record in our form, or raises a
DataError whose message names the file, line and field and whose `reason` is what the cleaning
pass (nanochat.clean_data) counts the row under.

    pretrain   {"text": "..."}
    sft        {"conversations": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} (or "messages")
    dpo        {"prompt": "...", "chosen": "...", "rejected": "..."}, or MiniMind's
               {"chosen": [messages], "rejected": [messages]} whose turns before the final reply are equal
    reasoning  sft whose final reply thinks first: "<think>...</think>answer" (MiniMind's r1 data also
               wraps the answer in <answer>...</answer>: the tags are dropped)
"""
import re

from nanochat.common import DataError

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")
THINK_START, THINK_END = "<think>", "</think>"
_ANSWER_TAG = re.compile(r"</?answer>")

# reason -> what it means; the cleaning report counts every dropped row under one of these
REASONS = {
    "not_utf8": "the line is not valid UTF-8",
    "malformed_json": "the line is not JSON",
    "not_an_object": "the line is JSON but not an object",
    "missing_field": "a required field is missing",
    "wrong_type": "a field has the wrong type",
    "unknown_role": "a message role other than system, user, assistant",
    "bad_turn_order": "user and assistant do not alternate (user first; system only first)",
    "empty_content": "empty text, message or reply",
    "no_assistant_reply": "no assistant reply to train on",
    "bad_think_tags": "<think> / </think> (or <answer>) tags unbalanced or out of order",
    "no_think": "--kind=reasoning: the final reply has no <think> block",
    "prompt_mismatch": "DPO: chosen and rejected differ before their final replies",
    "identical_pair": "DPO: chosen and rejected replies are the same (no gradient)",
    "garbage_text": "mostly mojibake, replacement or control characters",
    "too_long": "longer than --max_tokens with our tokenizer",
    "duplicate": "the same record (after whitespace normalisation) as an earlier row",
    "near_duplicate": "--near_dup: nearly the same text as an earlier row (MinHash)",
}
# rows dropped for these are not malformed: --strict still drops them instead of stopping
QUALITY_REASONS = ("identical_pair", "garbage_text", "too_long", "duplicate", "near_duplicate")


def check_text_row(obj: dict, where: str) -> str:
    """A pretraining row {"text": str} -> the text (possibly blank: callers decide)."""
    if "text" not in obj:
        raise DataError(f'{where}: field "text": missing', "missing_field")
    if not isinstance(obj["text"], str):
        raise DataError(f'{where}: field "text" must be a string, got {type(obj["text"]).__name__}', "wrong_type")
    return obj["text"]


def check_conversation(obj: dict, where: str, require_think: bool = False) -> dict:
    """A MiniMind conversation -> {"conversations": messages}, its think markup in our form."""
    key = "conversations" if "conversations" in obj else "messages" if "messages" in obj else None
    if key is None:
        raise DataError(f"{where}: field 'conversations' (or 'messages') is missing; keys: {sorted(obj)}", "missing_field")
    messages = check_messages(obj[key], key, where)
    messages = [with_think_markup(m, f"{where}: field '{key}[{i}].content'") for i, m in enumerate(messages)]
    last = messages[-1]
    if require_think and (last["role"] != "assistant" or THINK_END not in _text_of(last["content"])):
        raise DataError(f"{where}: field '{key}[{len(messages) - 1}].content': the final reply has no <think> block",
                        "no_think")
    return {"conversations": messages}


def check_messages(messages, key: str, where: str) -> list:
    """Validate a message list (field `key` of the row): an optional system message first, then
    user and assistant alternating (user first), at least one assistant reply. Content is a
    non-empty string; an assistant's may also be a list of parts {"type": PART_TYPES, "text": str}."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: field '{key}' must be a list of messages, got {type(messages).__name__}", "wrong_type")
    if not messages:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of messages", "empty_content")
    turn = 0  # index among the user/assistant messages
    for i, msg in enumerate(messages):
        field = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(f"{where}: field '{field}' must be an object with 'role' and 'content'", "wrong_type")
        for name in ("role", "content"):
            if name not in msg:
                raise DataError(f"{where}: field '{field}.{name}' is missing", "missing_field")
        role = msg["role"]
        if role not in ROLES:
            raise DataError(f"{where}: field '{field}.role': unknown role {role!r} (expected system, user or assistant)",
                            "unknown_role")
        if role == "system":
            if i != 0:
                raise DataError(f"{where}: field '{field}.role': a system message may only come first", "bad_turn_order")
        else:
            expected = "user" if turn % 2 == 0 else "assistant"
            if role != expected:
                raise DataError(f"{where}: field '{field}.role': {role!r} out of order, expected {expected!r} "
                                f"(user and assistant alternate, user first)", "bad_turn_order")
            turn += 1
        _check_content(msg["content"], role, field, where)
    if turn < 2:
        raise DataError(f"{where}: field '{key}': needs a user message followed by an assistant reply", "no_assistant_reply")
    return messages


def _check_content(content, role, field, where):
    if isinstance(content, list) and role == "assistant":
        if not content:
            raise DataError(f"{where}: field '{field}.content': empty list of parts", "empty_content")
        for j, part in enumerate(content):
            pfield = f"{field}.content[{j}]"
            if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
                raise DataError(f"{where}: field '{pfield}.type' must be one of {', '.join(PART_TYPES)}", "wrong_type")
            if not isinstance(part.get("text"), str):
                raise DataError(f"{where}: field '{pfield}.text' must be a string", "wrong_type")
    elif not isinstance(content, str):
        raise DataError(f"{where}: field '{field}.content' must be a string, got {type(content).__name__}", "wrong_type")
    elif not content.strip():
        raise DataError(f"{where}: field '{field}.content' is empty", "empty_content")


def _text_of(content) -> str:
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


# -----------------------------------------------------------------------------
# Reasoning traces

def think_markup(text: str, where: str, need_answer: bool = True) -> str:
    """An assistant reply's reasoning markup in our form: '<think>thinking</think>answer', the
    thinking and the answer stripped, MiniMind's <answer>...</answer> tags dropped. A reply that
    closes a think block it never opened (R1 dumps whose template held the <think>) gets one.
    need_answer=False for a text part that a tool call may follow."""
    if "answer>" in text:
        if text.count("<answer>") != text.count("</answer>") or text.count("<answer>") > 1:
            raise DataError(f"{where}: <answer> tags unbalanced", "bad_think_tags")
        text = _ANSWER_TAG.sub("", text).strip()
    if THINK_START not in text and THINK_END not in text:
        return text
    if THINK_START not in text:
        text = THINK_START + text
    head, _, rest = text.partition(THINK_START)
    thinking, sep, answer = rest.partition(THINK_END)
    if not sep or THINK_START in rest or THINK_END in answer:
        raise DataError(f"{where}: needs exactly one <think> ... </think> block", "bad_think_tags")
    if need_answer and not answer.strip():
        raise DataError(f"{where}: no answer after </think>", "empty_content")
    return (head.strip() + " " if head.strip() else "") + THINK_START + thinking.strip() + THINK_END + answer.strip()


def with_think_markup(msg: dict, where: str) -> dict:
    """The message with think_markup applied to an assistant's text (a copy only when it changes)."""
    content = msg["content"]
    if msg["role"] != "assistant" or ("think>" not in str(content) and "answer>" not in str(content)):
        return msg
    if isinstance(content, str):
        return dict(msg, content=think_markup(content, where))
    return dict(msg, content=[dict(p, text=think_markup(p["text"], f"{where}[{j}].text", False)) if p["type"] == "text" else p
                              for j, p in enumerate(content)])


# -----------------------------------------------------------------------------
# Preference pairs

def check_preference_pair(obj: dict, where: str) -> dict:
    """A DPO row -> {"prompt": str, "chosen": conversation, "rejected": conversation}. Either
    {"prompt", "chosen", "rejected"} strings, or MiniMind's {"chosen": [messages], "rejected":
    [messages]}: the same turns, then a different final assistant reply. "prompt" is the last user
    message (what chat_dpo splits train / held-out by)."""
    for name in ("chosen", "rejected"):
        if name not in obj:
            raise DataError(f"{where}: field '{name}' is missing", "missing_field")
    if isinstance(obj["chosen"], list) or isinstance(obj["rejected"], list):
        return _message_list_pair(obj, where)
    for name in ("prompt", "chosen", "rejected"):
        if name not in obj:
            raise DataError(f"{where}: field '{name}' is missing", "missing_field")
        if not isinstance(obj[name], str):
            raise DataError(f"{where}: field '{name}' must be a non-empty string (or, for chosen and rejected, "
                            f"a list of messages), got {type(obj[name]).__name__}", "wrong_type")
        if not obj[name].strip():
            raise DataError(f"{where}: field '{name}' must be a non-empty string", "empty_content")

    def conversation(reply):
        return {"conversations": [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": reply}]}
    return {"prompt": obj["prompt"], "chosen": conversation(obj["chosen"]), "rejected": conversation(obj["rejected"])}


def _message_list_pair(obj, where):
    if "prompt" in obj:
        raise DataError(f"{where}: field 'prompt': with message lists in 'chosen' and 'rejected' the shared turns go "
                        f"inside them (MiniMind's format), not in 'prompt'", "wrong_type")
    chosen, rejected = (check_messages(obj[name], name, where) for name in ("chosen", "rejected"))
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{name}[{len(messages) - 1}]': the last message must be the assistant's "
                            f"reply", "no_assistant_reply")
    if len(chosen) != len(rejected):
        raise DataError(f"{where}: field 'rejected': {len(rejected)} messages, 'chosen' has {len(chosen)} (the turns "
                        f"before the final reply must be the same)", "prompt_mismatch")
    for i, (c, r) in enumerate(zip(chosen[:-1], rejected[:-1])):
        for name in ("role", "content"):
            if c[name] != r[name]:
                raise DataError(f"{where}: field 'rejected[{i}].{name}' differs from 'chosen[{i}].{name}' (the turns "
                                f"before the final reply must be the same)", "prompt_mismatch")
    prompt = [m["content"] for m in chosen if m["role"] == "user"][-1]
    return {"prompt": prompt, "chosen": {"conversations": chosen}, "rejected": {"conversations": rejected}}
