"""
A pretraining run sized to its data. The horizon is target_param_data_ratio x parameters tokens
(Chinchilla's ~20); a corpus that holds fewer tokens is read several times (epochs), and past a
few epochs a model memorizes rather than learns. So:
- with a network, fetch exactly the shards the horizon needs (nanochat.download);
- without one, shrink the model until the offline corpus covers its horizon within max_epochs;
- base_train refuses a run over max_epochs before its first step (epoch_problem).

    python -m nanochat.plan --gpus=8 configs/d20.py          # what speedrun.sh --plan prints
    python -m nanochat.plan --gpus=8 configs/d20.py --shell  # the same as shell assignments for speedrun.sh
"""
import argparse
import json
import math
import os
import runpy
import shlex
import sys

from nanochat.common import get_base_dir, peak_flops_from_name
from nanochat.download import WEB_SOURCES, parse_mixture, reachable, shards_for_tokens, tokens_per_shard

MAX_EPOCHS = 4.0          # base_train's default limit
ASSUMED_MFU = 0.40        # for the time estimate only
ASSUMED_GPU = "H100"      # when the plan is made on a machine without the GPUs
TOKENIZER_CHARS = 2e9     # GPU mode trains the tokenizer on this much text (nanochat's speedrun)
OFFLINE_VOCAB = 8192      # the offline corpus (~38 MB) is too small for a 65k vocabulary
OFFLINE_BYTES_PER_TOKEN = 3.5  # the default corpus with an 8192 tokenizer (measured: 37.5 MB of train text, 10.67M tokens)
DEFAULT_CORPUS_BYTES = 37.9e6  # the default offline corpus, before it is built
MIN_STEPS = 500           # a small offline model still gets this many optimizer steps


def model_size(depth, vocab_size, sequence_len, **moe):
    """(parameters, active parameters, training FLOPs per token) of the depth-d model, built on the
    meta device (no memory, no time)."""
    import torch
    from nanochat.gpt import GPT, config_from_depth
    with torch.device("meta"):
        model = GPT(config_from_depth(depth, vocab_size=vocab_size, sequence_len=sequence_len, **moe))
    return model.num_params(), model.num_active_params(), model.estimate_flops()


def largest_depth(corpus_tokens, vocab_size, sequence_len, ratio, max_epochs=MAX_EPOCHS, max_depth=64, **moe):
    """The largest depth whose horizon (ratio x active params) is at most max_epochs passes over
    corpus_tokens, or None if not even depth 1 fits."""
    best = None
    for depth in range(1, max_depth + 1):
        try:
            active = model_size(depth, vocab_size, sequence_len, **moe)[1]
        except AssertionError:  # e.g. a fixed n_kv_head that this depth's heads cannot share
            continue
        if ratio * active > max_epochs * corpus_tokens:
            break
        best = depth
    return best


def epoch_problem(stats, max_epochs, depth, vocab_size, sequence_len, ratio, total_batch_size, data_dir, **moe):
    """None if the run's epochs (from data_stats.corpus_stats) are within max_epochs, else the message
    base_train stops with: the figures and the ways out."""
    run = stats["_run"]
    if run["train_tokens"] == 0:
        return (f"{data_dir} holds no train text: build it (python -m nanochat.dataset), download it "
                f"(python -m nanochat.dataset --sources=fineweb-edu --tokens=...) or point --data_dir at it")
    if run["epochs"] <= max_epochs:
        return None
    corpus, needed = run["train_tokens"], run["tokens_to_train"]
    fits = largest_depth(corpus, vocab_size, sequence_len, ratio, max_epochs, max_depth=depth - 1, **moe) if depth > 1 else None
    fixes = [f"more data: python -m nanochat.dataset --sources=fineweb-edu --tokens={needed:.3g} (needs a network; "
             f"then --data_dir={os.path.join(get_base_dir(), 'web_data')})"]
    if fits:
        fixes.append(f"a smaller model: --depth={fits} fits this corpus within {max_epochs:g} epochs")
    fixes.append(f"a shorter run: --num_iterations={int(max_epochs * corpus // total_batch_size)} ({max_epochs:g} epochs)")
    fixes.append(f"or --max_epochs={run['epochs'] * 1.01:.3g} if repeating the data is what you want")
    return (f"this run would read its data {run['epochs']:,.1f} times: it trains on {needed:,} tokens and "
            f"{data_dir} holds {corpus:,} train tokens; past --max_epochs={max_epochs:g} a model memorizes "
            f"rather than learns. Fixes:\n" + "\n".join(f"  - {f}" for f in fixes))


def batch_for(tokens, gpus, sequence_len, device_batch_size, total_batch_size):
    """(device_batch_size, total_batch_size) giving a short run at least MIN_STEPS steps: the total
    halves (and the micro-batch with it) until it does, never below one row per GPU."""
    while total_batch_size > sequence_len * gpus and tokens / total_batch_size < MIN_STEPS:
        total_batch_size //= 2
    device_batch_size = min(device_batch_size, max(1, total_batch_size // (sequence_len * gpus)))
    return device_batch_size, total_batch_size


def offline_corpus_tokens(data_dir, vocab_size):
    """(train tokens, exact?) of the offline corpus: counted with the trained tokenizer when it and
    the corpus exist, else estimated from the corpus size."""
    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    stats_path = os.path.join(data_dir, "dataset_stats.json")
    if os.path.exists(stats_path) and os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        from nanochat.data_stats import corpus_stats
        from nanochat.tokenizer import get_tokenizer
        tokenizer = get_tokenizer()
        if tokenizer.get_vocab_size() == vocab_size:
            return corpus_stats(data_dir, tokenizer, 0)["_run"]["train_tokens"], True
    if os.path.exists(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            stats = json.load(f)
        train_bytes = sum(s["utf8_bytes"] * s["train_docs"] / s["documents"] for s in stats.values())
    else:
        train_bytes = DEFAULT_CORPUS_BYTES * 0.99
    return int(train_bytes / OFFLINE_BYTES_PER_TOKEN), False


def make_plan(config, gpus, sources, base_url=None, depth=None, max_epochs=MAX_EPOCHS, offline_reason=None,
              gpu_name=None, data_dir=None, **moe):
    """The run speedrun.sh launches in GPU mode, as a dict (see format_plan). Web data when every
    source answers (and no offline_reason is given), else the offline corpus."""
    c = runpy.run_path(config)
    seq_len, ratio = c.get("max_seq_len", 2048), c.get("target_param_data_ratio", 20)
    device_batch_size, total_batch_size = c.get("device_batch_size", 32), c.get("total_batch_size", 524288)
    depth = depth or c.get("depth", 20)
    mixture = parse_mixture(sources)
    web_dir = data_dir or os.path.join(get_base_dir(), "web_data")
    why_offline = offline_reason
    if why_offline is None and not downloaded(web_dir, mixture, depth, seq_len, ratio, moe):
        why_offline = reachable(mixture, base_url)
    plan = {"gpus": gpus, "config": config, "sequence_len": seq_len, "ratio": ratio, "max_epochs": max_epochs,
            "gpu_name": gpu_name or ASSUMED_GPU, "gpu_detected": bool(gpu_name)}
    if why_offline is None:
        vocab = 65536
        params, active, flops = model_size(depth, vocab, seq_len, **moe)
        tokens = ratio * active
        shards = shards_for_tokens(mixture, tokens)
        tok_shards = {s: 1 + math.ceil(TOKENIZER_CHARS * w / WEB_SOURCES[s]["chars_per_shard"]) for s, w in mixture.items()}
        held = sum((n - 1) * tokens_per_shard(s) for s, n in shards.items())
        gigabytes = sum(n * WEB_SOURCES[s]["mb_per_shard"] / 1000 for s, n in shards.items())
        plan.update(data="web", sources=mixture, base_url=base_url, shards=shards,
                    tokenizer_shards={s: min(n, shards[s]) for s, n in tok_shards.items()},
                    download_gb=gigabytes, data_dir=web_dir, epochs=tokens / held)
    else:
        vocab = OFFLINE_VOCAB
        data_dir = data_dir or os.path.join(get_base_dir(), "base_data")
        corpus, exact = offline_corpus_tokens(data_dir, vocab)
        depth = largest_depth(corpus, vocab, seq_len, ratio, max_epochs, max_depth=depth, **moe) or 1
        params, active, flops = model_size(depth, vocab, seq_len, **moe)
        tokens = min(ratio * active, int(max_epochs * corpus))
        plan.update(data="offline", why_offline=why_offline, data_dir=data_dir, corpus_tokens=corpus,
                    corpus_exact=exact, epochs=tokens / corpus)
        device_batch_size, total_batch_size = batch_for(tokens, gpus, seq_len, device_batch_size, total_batch_size)
    while total_batch_size % (device_batch_size * seq_len * gpus):
        device_batch_size //= 2  # total_batch_size must split evenly over the GPUs' micro-batches
    steps = max(1, tokens // total_batch_size)
    peak = peak_flops_from_name(plan["gpu_name"]) or peak_flops_from_name(ASSUMED_GPU)
    plan.update(depth=depth, vocab=vocab, params=params, active_params=active, flops_per_token=flops, tokens=tokens,
                steps=steps, device_batch_size=device_batch_size, total_batch_size=total_batch_size,
                hours=flops * steps * total_batch_size / (gpus * peak * ASSUMED_MFU) / 3600)
    return plan


def downloaded(web_dir, mixture, depth, sequence_len, ratio, moe):
    """Whether web_dir already holds every shard the plan would fetch (then no network is needed)."""
    from nanochat.download import read_mixture, shard_name
    if not os.path.isdir(web_dir) or read_mixture(web_dir) != mixture:
        return False
    shards = shards_for_tokens(mixture, ratio * model_size(depth, 65536, sequence_len, **moe)[1])
    return all(os.path.exists(os.path.join(web_dir, s, shard_name(i))) for s, n in shards.items() for i in range(n))


def cpu_plan(config, data_dir=None):
    """What the CPU speedrun trains: the config as it stands (fixed steps), against the offline corpus."""
    c = runpy.run_path(config)
    data_dir = data_dir or os.path.join(get_base_dir(), "base_data")
    seq_len, depth = c.get("max_seq_len", 2048), c.get("depth", 20)
    params, active, flops = model_size(depth, OFFLINE_VOCAB, seq_len)
    tokens = c["num_iterations"] * c["total_batch_size"]
    corpus, exact = offline_corpus_tokens(data_dir, OFFLINE_VOCAB)
    return (f"mode        cpu\nconfig      {config}\n"
            f"depth       {depth} (width {64 * depth}, context {seq_len}, vocab {OFFLINE_VOCAB:,})\n"
            f"parameters  {params:,}\n"
            f"tokens      {tokens:,} = {tokens / active:.2f} x parameters ({c['num_iterations']:,} steps of {c['total_batch_size']:,})\n"
            f"data        the offline corpus {data_dir}: {corpus:,} train tokens{'' if exact else ' (estimated)'}\n"
            f"shards      none to fetch\n"
            f"epochs      {tokens / corpus:.2f} (limit {MAX_EPOCHS:g})\n"
            f"time        tens of minutes on 2 cores")


def format_plan(p):
    gpu = f"{p['gpus']} x {p['gpu_name']}" + ("" if p["gpu_detected"] else " (assumed)")
    lines = [f"mode        gpu: {gpu}, {'web data' if p['data'] == 'web' else 'offline corpus'}",
             f"config      {p['config']}",
             f"depth       {p['depth']} (width {64 * p['depth']}, context {p['sequence_len']}, vocab {p['vocab']:,})",
             f"parameters  {p['params']:,}" + (f" ({p['active_params']:,} active)" if p['active_params'] != p['params'] else ""),
             f"tokens      {p['tokens']:,} = {p['tokens'] / p['active_params']:.1f} x parameters "
             f"({p['steps']:,} steps of {p['total_batch_size']:,}; {p['device_batch_size']} rows of {p['sequence_len']} per GPU)"]
    if p["data"] == "web":
        mix = " + ".join(f"{s} {w:.0%}" for s, w in p["sources"].items())
        where = p["base_url"] or "each source's home (Hugging Face)"
        lines += [f"data        {mix} from {where} into {p['data_dir']}",
                  f"shards      fetch {' + '.join(f'{n} {s}' for s, n in p['shards'].items())} "
                  f"(shard 0 of each is val; about {p['download_gb']:.1f} GB); the tokenizer starts after "
                  f"{' + '.join(str(n) for n in p['tokenizer_shards'].values())}",
                  f"epochs      about {p['epochs']:.2f} (limit {p['max_epochs']:g})"]
    else:
        lines += [f"data        the offline corpus {p['data_dir']}: {p['corpus_tokens']:,} train tokens"
                  f"{'' if p['corpus_exact'] else ' (estimated; counted once the tokenizer is trained)'}",
                  f"            no web data: {p['why_offline']}",
                  f"            so the largest depth whose horizon fits {p['max_epochs']:g} epochs",
                  "shards      none to fetch",
                  f"epochs      {p['epochs']:.2f} (limit {p['max_epochs']:g})"]
    duration = f"{p['hours']:.1f} h" if p["hours"] >= 1 else f"{max(1, round(p['hours'] * 60))} min"
    lines.append(f"time        about {duration} of pretraining at {ASSUMED_MFU:.0%} MFU")
    return "\n".join(lines)


def shell_plan(p):
    """The plan as shell assignments (PLAN_*), for speedrun.sh to eval."""
    values = {"PLAN_DATA": p["data"], "PLAN_DEPTH": p["depth"], "PLAN_VOCAB": p["vocab"], "PLAN_DATA_DIR": p["data_dir"],
              "PLAN_DEVICE_BATCH_SIZE": p["device_batch_size"], "PLAN_TOTAL_BATCH_SIZE": p["total_batch_size"],
              "PLAN_NUM_ITERATIONS": p["steps"]}
    if p["data"] == "web":
        values["PLAN_SOURCES"] = ",".join(f"{s}:{w:.6g}" for s, w in p["sources"].items())
        values["PLAN_SHARDS"] = ",".join(str(n) for n in p["shards"].values())
        values["PLAN_TOKENIZER_SHARDS"] = ",".join(str(n) for n in p["tokenizer_shards"].values())
    else:
        values["PLAN_WHY_OFFLINE"] = p["why_offline"]
    return "\n".join(f"{k}={shlex.quote(str(v))}" for k, v in values.items())


def main(argv=None):
    parser = argparse.ArgumentParser(description="Size a GPU pretraining run to its data.")
    parser.add_argument("config", nargs="?", default="configs/d20.py")
    parser.add_argument("--gpus", type=int, default=None, help="default: $NANOCHAT_GPUS, else the GPUs torch sees")
    parser.add_argument("--depth", type=int, default=None, help="default: the config's")
    parser.add_argument("--sources", default="fineweb-edu:0.8,fineweb-edu-zh:0.2")
    parser.add_argument("--base_url", default=os.environ.get("NANOCHAT_DATA_URL"))
    parser.add_argument("--max_epochs", type=float, default=MAX_EPOCHS)
    parser.add_argument("--offline", action="store_true", help="plan for the offline corpus without probing the network")
    parser.add_argument("--moe", action="store_true", help="4 experts, top-1 (speedrun's USE_MOE)")
    parser.add_argument("--shell", action="store_true", help="print PLAN_* shell assignments")
    parser.add_argument("--cpu", action="store_true", help="the CPU run of a config with fixed steps (no GPU, no download)")
    args = parser.parse_args(argv)
    if args.cpu:
        return print(cpu_plan(args.config))
    gpus, gpu_name = args.gpus, None
    if gpus is None and os.environ.get("NANOCHAT_GPUS"):
        gpus = int(os.environ["NANOCHAT_GPUS"])
    import torch
    if torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name(0)
        gpus = gpus or torch.cuda.device_count()
    moe = dict(n_experts=4, experts_per_token=1) if args.moe else {}
    plan = make_plan(args.config, gpus or 1, args.sources, args.base_url, args.depth, args.max_epochs,
                     offline_reason="--offline given" if args.offline else None, gpu_name=gpu_name, **moe)
    print(shell_plan(plan) if args.shell else format_plan(plan))


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
