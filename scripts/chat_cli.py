"""
Talk to a chat model in the terminal, the reply streaming as it is generated.

    python -m scripts.chat_cli                                   # newest of chatrl > chatdpo > chatsft > mid
    python -m scripts.chat_cli -p "What is 12 plus 30?"          # answer once and exit
    python -m scripts.chat_cli --checkpoint=chatsft_checkpoints/d4 -t 0.8 -k 50 --max_tokens=512

In the chat: /clear starts a new conversation, /exit (or Ctrl-D) quits, Ctrl-C stops the
reply being written (at the prompt it just clears the line). Calculator calls show as [calc: 12+30 = 42],
python calls (run in the sandbox; --tools=calc: the calculator only, --tools=none: no tool) as a block:
    [python]
    print('strawberry'.count('r'))
    [output]
    3
    [/python]
A reasoning model's <think> ... </think> block is hidden unless --open_thinking (then it is shown
between the markers, before the answer).
"""
import os
import signal
import sys

if __package__ in (None, ""):  # also runnable as `python scripts/chat_cli.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import torch

from nanochat.checkpoint_manager import CheckpointError, load_model
from nanochat.common import autocast_for, autodetect_device_type
from nanochat.configurator import configure
from nanochat.engine import Engine
from nanochat.reply import ReplyDecoder
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
tools = "python"               # python (the calculator, else the sandbox) | calc | none
python_timeout = 5.0           # seconds per python call
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
engine = Engine(model, tokenizer, tools=tools, python_timeout=python_timeout)
# Ctrl-C stops a reply. Python raises KeyboardInterrupt only if SIGINT was not ignored when it started
# (it is in a job started with & by a shell script), so say it, as the training scripts do.
signal.signal(signal.SIGINT, signal.default_int_handler)
special = {name: tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
bos, assistant_end = tokenizer.get_bos_token_id(), special["<|assistant_end|>"]
max_context = 10 * model.config.sequence_len  # the rotary table's length


def reply(conversation, header=""):
    """Generate the assistant's turn after `conversation` (token ids ending in <|assistant_start|>),
    streaming it after `header` as nanochat.reply shows it; returns the ids to append (always
    ending in <|assistant_end|>)."""
    decoder, generated = ReplyDecoder(tokenizer, show_thinking=open_thinking), []
    budget = min(max_tokens, max_context - len(conversation))
    try:
        print(header, end="", flush=True)
        with autocast:
            for token, _ in engine.stream(conversation, max_tokens=budget, temperature=temperature,
                                          top_k=top_k or None, top_p=top_p if top_p < 1.0 else None,
                                          repetition_penalty=repetition_penalty, seed=seed + len(conversation)):
                generated.append(token)
                print(decoder.add(token), end="", flush=True)
    except KeyboardInterrupt:  # Ctrl-C stops this reply only
        print(" [stopped]", end="")
    print(decoder.finish(), end="")
    if decoder.thinking and not open_thinking:  # the reply ended inside a hidden block
        print("[thinking not finished; --open_thinking shows it]", end="")
    print(flush=True)
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
