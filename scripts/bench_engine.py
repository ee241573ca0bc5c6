"""
Benchmark the decoding engine (nanochat.engine), in one run, same model, same sampler:
1. KV cache: the engine against recomputing the whole sequence every step (batch 1 and 8 of one
   prompt); the bar was >= 5x at 256 tokens.
2. Continuous batching: N different prompts (chat questions of different lengths) decoded together
   in one engine against the same N one at a time (max_batch_size=1). Greedy, so both must give
   the same tokens: the script checks it and exits 1 if not.

    python -m scripts.bench_engine                                   # random depth-4 model, 256 new tokens
    python -m scripts.bench_engine --checkpoint=chatsft_checkpoints/d4 --num_prompts=32 --max_tokens=128
    python -m scripts.bench_engine --max_tokens=32                   # a quick look

Without --checkpoint the model is randomly initialised (speed does not depend on the weights) and
its vocab comes from the trained tokenizer at <base>/tokenizer when there is one, else from a tiny
one trained here. A random model may emit a stop token early: the recompute path runs as many
steps as the engine took, and the batching part counts the tokens each sequence really produced.
"""
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import time
from contextlib import nullcontext

import torch

from nanochat.common import autodetect_device_type, seed_everything
from nanochat.configurator import configure
from nanochat.engine import Engine, Sequence, sample_next_token
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer

# ----------------------------------------------------------------------------- defaults
device_type = ""
checkpoint = ""               # a trained model (e.g. chatsft_checkpoints/d4); empty: a random one of `depth`
depth = 4
max_tokens = 256              # new tokens per sequence
batch_sizes = "1,8"           # part 1: samples of one prompt
num_prompts = 32              # part 2: different prompts decoded together
temperature = 1.0             # part 1 (part 2 is greedy)
num_threads = 0               # CPU threads for torch; 0 = torch's default
seed = 1337
user_config = configure(globals())
# -----------------------------------------------------------------------------

QUESTIONS = ["What is 12 plus 30?", "Who are you?", "你好，你是谁？", "Tell me something about the sea.",
             "How many r are in the word strawberry?", "What is 7 times 8?", "Say hello in French.",
             "Write a short poem about cats.", "Why is the sky blue? Explain it to a child in a few sentences.",
             "List three fruits.", "请用一句话介绍一下长城。", "What is the capital of France?"]

device_type = device_type or autodetect_device_type()
device = torch.device(device_type)
if num_threads > 0:
    torch.set_num_threads(num_threads)
sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
seed_everything(seed)
if checkpoint:
    from nanochat.checkpoint_manager import load_model
    tokenizer = get_tokenizer()
    model, _, checkpoint_dir, step = load_model(checkpoint, device, tokenizer)
    model_name = f"{checkpoint_dir} step {step}"
else:
    try:
        tokenizer = get_tokenizer()
        tokenizer_name = "<base>/tokenizer"
    except (OSError, ValueError):
        tokenizer = RustBPETokenizer.train_from_iterator(["The quick brown fox jumps over the lazy dog. " * 200], 512)
        tokenizer_name = "a tiny stand-in (no <base>/tokenizer)"
    with torch.device("meta"):
        model = GPT(config_from_depth(depth, tokenizer.get_vocab_size(), sequence_len=1024))
    model.to_empty(device=device)
    model.init_weights()
    model_name = f"random depth {depth}, tokenizer {tokenizer_name}"
model.eval()
engine = Engine(model, tokenizer)
prompt = tokenizer.render_for_completion({"conversations": [{"role": "user", "content": "Tell me a story about a fox."}]})
print(f"device {device_type}, {model_name}, vocab {model.config.vocab_size}, {model.num_params() / 1e6:.1f}M params, "
      f"{torch.get_num_threads()} threads")


# ----------------------------------------------------------------------------- 1. KV cache vs recompute
def run_cached(batch, n):
    sync()
    t0 = time.perf_counter()
    with autocast:
        steps = sum(1 for _ in engine.generate(prompt, num_samples=batch, max_tokens=n, temperature=temperature, seed=seed))
    sync()
    return steps, time.perf_counter() - t0


@torch.inference_mode()
def run_recompute(batch, n):
    rng = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt] * batch, dtype=torch.long, device=device)
    sync()
    t0 = time.perf_counter()
    with autocast:
        for _ in range(n):
            logits = model(ids)[:, -1, :]
            ids = torch.cat([ids, sample_next_token(logits, rng, temperature)[:, None]], dim=1)
    sync()
    return time.perf_counter() - t0


print(f"\n1. KV cache against recomputing: prompt {len(prompt)} tokens, {max_tokens} new tokens")
for batch in (int(b) for b in batch_sizes.split(",")):
    run_cached(batch, 8)  # warm-up (allocator, kernels)
    run_recompute(batch, 8)
    steps, t_cached = run_cached(batch, max_tokens)
    t_recompute = run_recompute(batch, steps)
    tps_cached, tps_recompute = batch * steps / t_cached, batch * steps / t_recompute
    print(f"batch {batch}: {steps} steps | kv-cache {tps_cached:8.1f} tok/s | recompute {tps_recompute:8.1f} tok/s"
          f" | ratio {tps_cached / tps_recompute:.1f}x")


# ----------------------------------------------------------------------------- 2. batched vs one at a time
def greedy_sequences():
    prompts = [tokenizer.render_for_completion({"conversations": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]
                                                                   + " " * (i // len(QUESTIONS))}]})
               for i in range(num_prompts)]
    return [Sequence(p, min(max_tokens, engine.context - len(p)), temperature=0.0) for p in prompts]


def run_engine(max_batch_size, one_at_a_time):
    e = Engine(model, tokenizer, max_batch_size=max_batch_size)
    seqs = greedy_sequences()
    sync()
    t0 = time.perf_counter()
    with autocast:
        for group in ([s] for s in seqs) if one_at_a_time else [seqs]:
            e.run(group)
    sync()
    return seqs, time.perf_counter() - t0


run_engine(num_prompts, False)  # warm-up
batched, t_batched = run_engine(num_prompts, False)
alone, t_alone = run_engine(1, True)
tokens = sum(len(s.tokens) for s in batched)
same = sum(a.tokens == b.tokens for a, b in zip(batched, alone))
print(f"\n2. {num_prompts} different prompts, greedy, up to {max_tokens} new tokens each ({tokens} in all)")
print(f"one at a time : {t_alone:7.2f} s | {tokens / t_alone:8.1f} tok/s")
print(f"batched       : {t_batched:7.2f} s | {tokens / t_batched:8.1f} tok/s | ratio {t_alone / t_batched:.1f}x")
print(f"identical outputs: {same}/{num_prompts}")
sys.exit(0 if same == num_prompts else 1)
