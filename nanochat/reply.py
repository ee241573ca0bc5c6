"""
A reply's tokens -> the text a user reads, as they come: the one decoder behind chat_cli, chat_web
and the engine's stop strings.

- Text is decoded from the whole current run, so a character split across tokens appears once
  complete (an incomplete UTF-8 sequence is held back; at the end it comes out as U+FFFD).
- A tool call <|python_start|> code <|python_end|> [<|output_start|> result <|output_end|>] reads as
  tool_call_text says: [calc: 12+30 = 42] for what the calculator takes, a [python] ... [/python]
  block for other code. chat_web turns both back into tool parts when a client sends the
  conversation again (nanochat.openai_api.assistant_parts).
- <think> ... </think> is shown with its markers, or hidden (show_thinking=False).
- A stop token (<|assistant_end|>, <|bos|>) ends the reply; an unclosed call is closed with "?".
  No special token's text ever reaches the user: inside a call they close it, elsewhere they vanish.
"""
from nanochat.tokenizer import SPECIAL_TOKENS
from nanochat.tools import calculator


def tool_call_text(code, output):
    """How a tool call reads in a reply (output None: nothing came back).
    Code the calculator takes (the engine ran it there): "[calc: 12+30 = 42]", "?" for no output.
    Other code (python, in the sandbox), on lines of its own; without output, no [output] part:
        [python]
        print('strawberry'.count('r'))
        [output]
        3
        [/python]"""
    if calculator(code) is not None:
        return f"[calc: {code} = {'?' if output is None else output}]"
    shown = "" if output is None else f"\n[output]\n{output}"
    return f"\n[python]\n{code}{shown}\n[/python]\n"


class ReplyDecoder:
    def __init__(self, tokenizer, show_thinking=True):
        self.tokenizer, self.show_thinking = tokenizer, show_thinking
        sp = tokenizer.encode_special
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        self.think_start, self.think_end = sp("<think>"), sp("</think>")
        self.stop_ids = {sp("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.special_ids = {sp(name) for name in SPECIAL_TOKENS}
        self.run, self.shown = [], ""      # the current text run and how much of it was returned
        self.code, self.output, self.mode = [], [], "text"  # text | code | called | output
        self.thinking = self.done = False

    def _text(self, final=False):
        decoded = self.tokenizer.decode(self.run)
        if not final:
            decoded = decoded.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its next byte
        if not decoded.startswith(self.shown):
            return ""  # a later byte changed how earlier ones decode: what was shown stays shown
        new, self.shown = decoded[len(self.shown):], decoded
        return self._visible(new)

    def _visible(self, text):
        return text if self.show_thinking or not self.thinking else ""

    def _close_run(self):
        out = self._text(final=True)
        self.run, self.shown = [], ""
        return out

    def _close_call(self):
        code = self.tokenizer.decode(self.code).strip()
        output = self.tokenizer.decode(self.output).strip() if self.mode == "output" else None  # "": printed nothing
        self.code, self.output, self.mode = [], [], "text"
        return self._visible(tool_call_text(code, output))

    def add(self, token):
        """The text this token adds ("" while a character or a call is incomplete)."""
        if self.done:
            return ""
        out = ""
        if self.mode == "called" and token != self.output_start:
            out += self._close_call()  # the tool returned nothing: no output follows
        if self.mode in ("code", "output") and token in self.special_ids and token not in (self.python_end, self.output_end):
            out += self._close_call()  # a special token inside a call ends the call, and is never shown
        if token in self.stop_ids:
            return out + self.finish()
        if token == self.python_start:
            out += self._close_run()
            self.mode = "code"
        elif token == self.python_end and self.mode == "code":
            self.mode = "called"
        elif token == self.output_start and self.mode == "called":
            self.mode = "output"
        elif token == self.output_end and self.mode == "output":
            out += self._close_call()
        elif self.mode == "code":
            self.code.append(token)
        elif self.mode == "output":
            self.output.append(token)
        elif token in (self.think_start, self.think_end):
            out += self._close_run()
            if token == self.think_start:
                self.thinking = True
                out += self._visible("<think>")
            else:
                out += self._visible("</think>\n")
                self.thinking = False
        elif token not in self.special_ids:
            self.run.append(token)
            out += self._text()
        return out

    def finish(self):
        """The text still held back (an unclosed call, a cut character); the reply is over."""
        if self.done:
            return ""
        out = self._close_call() if self.mode != "text" else ""
        out += self._close_run()
        self.done = True
        return out


def held_back(text, stops):
    """How many trailing characters of text could be the start of a stop string (not shown yet)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def first_stop(text, stops, start=0):
    """Index of the earliest stop string in text[start:] (as an index into text), or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None
