"""
The OpenAI protocol of scripts/chat_web.py: request bodies -> validated settings (every bad field a
400 naming it, in OpenAI's error shape), and logprobs in the shapes clients parse. No web framework
here: the server turns ApiError into a response.
"""
import json
import re

# a tool call as nanochat.reply.tool_call_text writes it: [calc: code = output] on one line, or a
# [python] block (its [output] part absent when nothing came back). Text is not escaped, so code or
# output holding a line "[/python]" (or code a line "[output]") would end its block early.
TOOL_CALL_RE = re.compile(r"\[calc: ([^\n]*?) = ([^\n]*?)\]"
                          r"|(?:^|\n)\[python\]\n(.*?)(?:\n\[output\]\n(.*?))?\n\[/python\](?:\n|$)", re.S)
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self):
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def number(body, name, default, low, high, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise ApiError(400, f"'{name}' must be a number, got {type(value).__name__}", param=name, code="invalid_type")
    if not (low < value <= high if low_open else low <= value <= high) or value != value:
        raise ApiError(400, f"'{name}' must be in {'(' if low_open else '['}{low}, {high}], got {value}",
                       param=name, code="invalid_value")
    return float(value)


def integer(body, name, default, low, high):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise ApiError(400, f"'{name}' must be an integer, got {type(value).__name__}", param=name, code="invalid_type")
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be in [{low}, {high}], got {value}", param=name, code="invalid_value")
    return value


def parse_body(raw: bytes):
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_type")
    if "model" in body and not isinstance(body["model"], str):
        raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
    return body


# ----------------------------------------------------------------------------- messages
def message_text(i, msg, max_chars):
    """A message's content as text: a string, or OpenAI content parts of type "text"."""
    content = msg.get("content")
    if isinstance(content, list):
        pieces = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content[{j}]: only parts of type 'text' with a string 'text' "
                                    "are supported", param=f"messages[{i}].content", code="invalid_type")
            pieces.append(part["text"])
        content = "".join(pieces)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts, "
                            f"got {type(content).__name__}", param=f"messages[{i}].content", code="invalid_type")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") decodes from JSON but is no text
        raise ApiError(400, f"messages[{i}].content is not valid Unicode text (a lone surrogate)",
                       param=f"messages[{i}].content", code="invalid_value") from None
    if not content.strip():
        raise ApiError(400, f"messages[{i}].content is empty", param=f"messages[{i}].content", code="empty_message")
    if len(content) > max_chars:
        raise ApiError(400, f"messages[{i}].content has {len(content)} characters; the limit is {max_chars}",
                       param=f"messages[{i}].content", code="message_too_long")
    return content


def assistant_parts(text):
    """An assistant reply as sent back by a client -> the tokenizer's parts: each tool call
    ([calc: expr = result] or a [python] block) becomes a python call and its output, as the model
    wrote them."""
    parts, pos = [], 0
    for m in TOOL_CALL_RE.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos:m.start()]})
        calc = m.group(1) is not None
        code, output = (m.group(1), m.group(2) if m.group(2) != "?" else None) if calc else (m.group(3), m.group(4))
        parts.append({"type": "python", "text": code})
        if output is not None:  # None: the tool returned nothing, no output was forced
            parts.append({"type": "python_output", "text": output})
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts if len(parts) != 1 or parts[0]["type"] != "text" else text


def parse_messages(body, max_messages, max_message_chars):
    """body["messages"] -> a conversation for the tokenizer (ending with the user's turn)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ApiError(400, "'messages' is required and must be a list of {role, content} objects",
                       param="messages", code="invalid_type")
    if not messages:
        raise ApiError(400, "'messages' is empty", param="messages", code="empty_messages")
    if len(messages) > max_messages:
        raise ApiError(400, f"{len(messages)} messages; the limit is {max_messages}", param="messages",
                       code="too_many_messages")
    conversation = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ApiError(400, f"messages[{i}] must be an object, got {type(msg).__name__}",
                           param=f"messages[{i}]", code="invalid_type")
        role = msg.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role {role!r} is not supported (use 'system', 'user' or 'assistant')",
                           param=f"messages[{i}].role", code="invalid_role")
        text = message_text(i, msg, max_message_chars)
        conversation.append({"role": role, "content": assistant_parts(text) if role == "assistant" else text})
    if conversation[-1]["role"] != "user":
        raise ApiError(400, "the last message must come from the user", param="messages", code="invalid_order")
    return conversation


def parse_prompt(body, max_chars):
    """body["prompt"] of /v1/completions: a string (or a list holding one string)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' is required and must be a non-empty string (one prompt per request)",
                       param="prompt", code="invalid_type")
    if len(prompt) > max_chars:
        raise ApiError(400, f"'prompt' has {len(prompt)} characters; the limit is {max_chars}", param="prompt",
                       code="message_too_long")
    if body.get("echo"):
        raise ApiError(400, "'echo' is not supported", param="echo", code="invalid_value")
    return prompt


# ----------------------------------------------------------------------------- sampling settings
def parse_stop(body, max_stop, max_stop_chars):
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > max_stop or \
            not all(isinstance(s, str) and 0 < len(s) <= max_stop_chars for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of up to {max_stop} non-empty strings of at most "
                            f"{max_stop_chars} characters", param="stop", code="invalid_value")
    return stop


def parse_logprobs(body, chat, stream, max_top_logprobs):
    """The number of top alternatives per token to return, or None for no logprobs. Chat: logprobs
    (bool) + top_logprobs (int); completions: logprobs (int). Not on a stream."""
    if chat:
        want = body.get("logprobs")
        if want is not None and not isinstance(want, bool):
            raise ApiError(400, "'logprobs' must be a boolean", param="logprobs", code="invalid_type")
        top = integer(body, "top_logprobs", None, 0, max_top_logprobs)
        if top is not None and not want:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
        k = (top or 0) if want else None
    else:
        k = integer(body, "logprobs", None, 0, max_top_logprobs)
    if k is not None and stream:
        raise ApiError(400, "'logprobs' is not supported with 'stream': true", param="logprobs", code="invalid_value")
    return k


def parse_settings(body, chat, *, vocab_size, max_max_tokens, max_n, max_top_logprobs, max_stop, max_stop_chars,
                   default_temperature, default_top_k):
    """Sampling and output settings of a request; max_tokens None means "whatever room is left"."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}",
                       param="stream_options", code="invalid_type")
    limit_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    return {
        "stream": stream, "include_usage": bool((options or {}).get("include_usage")),
        "n": integer(body, "n", 1, 1, max_n),
        "stop": parse_stop(body, max_stop, max_stop_chars),
        "logprobs": parse_logprobs(body, chat, stream, max_top_logprobs),
        "temperature": number(body, "temperature", default_temperature, 0.0, 2.0),
        "top_p": number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        "top_k": integer(body, "top_k", default_top_k, 0, vocab_size),
        "max_tokens": integer(body, limit_name, None, 1, max_max_tokens), "max_tokens_name": limit_name,
        "seed": integer(body, "seed", None, 0, 2 ** 63 - 1),
    }


def fit_context(prompt_len, settings, context_len, default_max_tokens, param):
    """Fill in max_tokens (the room left, up to default_max_tokens) or check it fits the context."""
    room = context_len - prompt_len
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_len} tokens; this model's context is {context_len} tokens "
                            "(prompt + reply): shorten it or start a new chat", param=param, code="context_length_exceeded")
    if settings["max_tokens"] is None:
        settings["max_tokens"] = min(default_max_tokens, room)
    elif settings["max_tokens"] > room:
        raise ApiError(400, f"the prompt is {prompt_len} tokens and {settings['max_tokens_name']} is "
                            f"{settings['max_tokens']}: together more than this model's context of {context_len} "
                            "tokens", param=settings["max_tokens_name"], code="context_length_exceeded")


# ----------------------------------------------------------------------------- logprobs out
def _entry(tokenizer, token, logprob):
    raw = tokenizer.token_bytes(token)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokenizer, token_logprobs):
    """Chat Completions' choices[i].logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    return {"content": [{**_entry(tokenizer, t, lp), "top_logprobs": [_entry(tokenizer, a, b) for a, b in top]}
                        for t, lp, top in token_logprobs]}


def completion_logprobs(tokenizer, token_logprobs):
    """Completions' choices[i].logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets, offset = [], [], 0
    for t, _, _ in token_logprobs:
        tokens.append(tokenizer.token_bytes(t).decode("utf-8", errors="replace"))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in token_logprobs],
            "top_logprobs": [{tokenizer.token_bytes(a).decode("utf-8", errors="replace"): b for a, b in top}
                             for _, _, top in token_logprobs], "text_offset": offsets}
