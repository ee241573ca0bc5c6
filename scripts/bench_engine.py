"""
Benchmark: KV-cached decoding (nanochat.engine.Engine) against recomputing the whole sequence
every step, same model, same prompt, same sampler, in one run. Prints tok/s of each for batch 1
and batch 8 and the ratio (the bar: >= 5x at 256 tokens).

    python -m scripts.bench_engine                     # depth 4, 256 new tokens
    python -m scripts.bench_engine --max_tokens=32     # a quick look

The model is randomly initialised (speed does not depend on the weights); its vocab comes from
the trained tokenizer at <base>/tokenizer when there is one, else from a tiny one trained here.
Both paths generate exactly the same number of tokens: the recompute path runs as many steps
as the engine took (a random model may emit a stop token early).
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
from nanochat.engine import Engine, sample_next_token
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer

# ----------------------------------------------------------------------------- defaults
device_type = ""
depth = 4
max_tokens = 256
batch_sizes = "1,8"
temperature = 1.0
num_threads = 0               # CPU threads for torch; 0 = torch's default
seed = 1337
user_config = configure(globals())
# -----------------------------------------------------------------------------

device_type = device_type or autodetect_device_type()
device = torch.device(device_type)
if num_threads > 0:
    torch.set_num_threads(num_threads)
sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
try:
    tokenizer = get_tokenizer()
    tokenizer_name = "<base>/tokenizer"
except (OSError, ValueError):
    tokenizer = RustBPETokenizer.train_from_iterator(["The quick brown fox jumps over the lazy dog. " * 200], 512)
    tokenizer_name = "a tiny stand-in (no <base>/tokenizer)"

seed_everything(seed)
config = config_from_depth(depth, tokenizer.get_vocab_size(), sequence_len=1024)
with torch.device("meta"):
    model = GPT(config)
model.to_empty(device=device)
model.init_weights()
model.eval()
engine = Engine(model, tokenizer)
prompt = tokenizer.render_for_completion({"conversations": [{"role": "user", "content": "Tell me a story about a fox."}]})
print(f"device {device_type}, depth {depth}, vocab {config.vocab_size} ({tokenizer_name}), "
      f"{model.num_params() / 1e6:.1f}M params, prompt {len(prompt)} tokens, {max_tokens} new tokens")


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


for batch in (int(b) for b in batch_sizes.split(",")):
    run_cached(batch, 8)  # warm-up (allocator, kernels)
    run_recompute(batch, 8)
    steps, t_cached = run_cached(batch, max_tokens)
    t_recompute = run_recompute(batch, steps)
    tps_cached, tps_recompute = batch * steps / t_cached, batch * steps / t_recompute
    print(f"batch {batch}: {steps} steps | kv-cache {tps_cached:8.1f} tok/s | recompute {tps_recompute:8.1f} tok/s"
          f" | ratio {tps_cached / tps_recompute:.1f}x")
