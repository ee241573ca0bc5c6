"""
Talk to a chat model in the terminal, the reply streaming as it is generated.

    python -m scripts.chat_cli                                   # newest of chatrl > chatdpo > chatsft > mid
    python -m scripts.chat_cli -p "What is 12 plus 30?"          # answer once and exit
    python -m scripts.chat_cli --checkpoint=chatsft_checkpoints/d4 -t 0.8 -k 50 --max_tokens=512

In the chat: /clear starts a new conversation, /exit (or Ctrl-D) quits, Ctrl-C stops the
reply being written (at the prompt it just clears the line). Calculator calls show as [calc: 12+30 = 42].
A reasoning model's <think> ... </think> block is hidden unless --open_thinking (then it is shown
between the markers, before the answer).
"""
import os
import sys

if __package__ in (None, ""):  # also runnable as `python scripts/chat_cli.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import torch

from nanochat.checkpoint_manager import CheckpointError, load_model
from nanochat.common import autocast_for, autodetect_device_type
from nanochat.configurator import configure
from nanochat.engine import Engine
from nanochat.tokenizer import get_tokenizer

# ----------------------------------------------------------------------------- defaults
checkpoint = ""                # empty: the newest checkpoint of chatrl, else chatdpo, chatsft, mid
prompt = ""                    # -p: answer this once and exit
temperature = 0.6              # -t; 0: greedy
top_k = 50                     # -k; 0: off
top_p = 1.0                    # 1.0: off
repetition_penalty = 1.0
max_tokens = 256               # per reply
open_thinking = False          # show the model's <think> ... </think> reasoning (hidden by default)
seed = 42
device_type = ""               # cuda | mps | cpu; empty: autodetect
configure(globals(), aliases={"p": "prompt", "t": "temperature", "k": "top_k"})
# -----------------------------------------------------------------------------


device = torch.device(device_type or autodetect_device_type())
autocast = autocast_for(device)
tokenizer = get_tokenizer()
try:
    model, meta, checkpoint_dir, step = load_model(checkpoint, device, tokenizer, default_stage="chat")
except CheckpointError as e:
    sys.exit(f"chat_cli: {e}")
engine = Engine(model, tokenizer)
special = {name: tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
bos, assistant_end = tokenizer.get_bos_token_id(), special["<|assistant_end|>"]
max_context = 10 * model.config.sequence_len  # the rotary table's length


class ReplyPrinter:
    """Prints a reply's tokens as they come: text incrementally (decoding the growing token list,
    so multi-byte characters print whole), a calculator call as [calc: expr = result]. A
    <think> ... </think> block is printed with its markers when open_thinking, else not at all."""

    def __init__(self, open_thinking=False):
        self.text, self.printed = [], ""  # current text run and what of it is on screen
        self.expr, self.output, self.mode = [], [], "text"
        self.open_thinking, self.thinking = open_thinking, False

    def _print(self, text):
        if self.open_thinking or not self.thinking:
            print(text, end="", flush=True)

    def _flush_text(self, final=False):
        decoded = tokenizer.decode(self.text)
        if not final:
            decoded = decoded.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its next byte
        self._print(decoded[len(self.printed):])
        self.printed = decoded

    def _end_call(self):
        expr = tokenizer.decode(self.expr).strip()
        result = tokenizer.decode(self.output).strip() if self.output else "?"
        self._print(f"[calc: {expr} = {result}]")
        self.expr, self.output, self.mode = [], [], "text"

    def add(self, token):
        if self.mode == "called" and token != special["<|output_start|>"]:
            self._end_call()  # the calculator refused the expression: no output follows
        if token in (special["<think>"], special["</think>"]):
            self._flush_text(final=True)
            self.text, self.printed = [], ""
            if token == special["<think>"]:
                self.thinking = True
                self._print("<think>")
            else:
                self._print("</think>\n")
                self.thinking = False
        elif token == special["<|python_start|>"]:
            self._flush_text(final=True)
            self.text, self.printed, self.mode = [], "", "expr"
        elif token == special["<|python_end|>"]:
            self.mode = "called"
        elif token == special["<|output_start|>"]:
            self.mode = "output"
        elif token == special["<|output_end|>"]:
            self._end_call()
        elif self.mode == "expr":
            self.expr.append(token)
        elif self.mode == "output":
            self.output.append(token)
        elif token not in (bos, assistant_end):
            self.text.append(token)
            self._flush_text()

    def finish(self):
        if self.mode != "text":
            self._end_call()
        self._flush_text(final=True)
        if self.thinking and not self.open_thinking:  # the reply ended inside a hidden block
            self.thinking = False
            self._print("[thinking not finished; --open_thinking shows it]")
        print(flush=True)


def reply(conversation, header=""):
    """Generate the assistant's turn after `conversation` (token ids ending in <|assistant_start|>),
    streaming it after `header`; returns the ids to append (always ending in <|assistant_end|>)."""
    printer, generated = ReplyPrinter(open_thinking), []
    budget = min(max_tokens, max_context - len(conversation))
    try:
        print(header, end="", flush=True)
        with autocast:
            for token, _ in engine.stream(conversation, max_tokens=budget, temperature=temperature,
                                          top_k=top_k or None, top_p=top_p if top_p < 1.0 else None,
                                          repetition_penalty=repetition_penalty, seed=seed + len(conversation)):
                generated.append(token)
                printer.add(token)
    except KeyboardInterrupt:  # Ctrl-C stops this reply only
        print(" [stopped]", end="")
    printer.finish()
    if generated and generated[-1] == bos:
        generated.pop()
    if not generated or generated[-1] != assistant_end:
        generated.append(assistant_end)
    return generated


def user_turn(text):
    return [special["<|user_start|>"], *tokenizer.encode(text), special["<|user_end|>"], special["<|assistant_start|>"]]


if prompt:
    reply([bos, *user_turn(prompt)])
    sys.exit(0)

print(f"nanochat ({os.path.relpath(checkpoint_dir)} step {step}) | /clear new conversation, /exit quit, "
      "Ctrl-C stops a reply")
conversation = [bos]
while True:
    try:
        text = input("\nUser: ").strip()
    except KeyboardInterrupt:  # a late Ctrl-C meant for the reply must not end the session
        print("^C (/exit or Ctrl-D to quit)")
        continue
    except EOFError:
        print()
        break
    if text in ("/exit", "/quit"):
        break
    if text == "/clear":
        conversation = [bos]
        print("(new conversation)")
        continue
    if not text:
        continue
    conversation += user_turn(text)
    conversation += reply(conversation, header="Assistant: ")
