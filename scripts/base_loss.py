"""
Bits per byte of a base checkpoint on the train and val shards, plus a few greedy samples.

    python -m scripts.base_loss --checkpoint=base_checkpoints/latest
    torchrun --nproc_per_node=2 -m scripts.base_loss -- --checkpoint=base_checkpoints/d4
"""
import os
import sys

if __package__ in (None, ""):  # also runnable as `python scripts/base_loss.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



from nanochat.checkpoint_manager import load_model
from nanochat.common import autocast_for, compute_cleanup, compute_init, print0
from nanochat.configurator import configure
from nanochat.dataloader import data_loader
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes, get_tokenizer

# ----------------------------------------------------------------------------- defaults
checkpoint = "base_checkpoints/latest"
device_type = ""
device_batch_size = 16
split_tokens = 1048576        # tokens evaluated per split
data_dir = ""
max_new_tokens = 24
user_config = configure(globals())
# -----------------------------------------------------------------------------

ddp, rank, local_rank, world_size, device = compute_init(device_type)
autocast = autocast_for(device)
tokenizer = get_tokenizer()
model, meta, checkpoint_dir, step = load_model(checkpoint, device, tokenizer, default_stage="base")
token_bytes = get_token_bytes(device=device)
seq_len = model.config.sequence_len
steps = max(1, split_tokens // (device_batch_size * seq_len * world_size))
print0(f"checkpoint: {checkpoint_dir} step {step}")

results = {}
for split in ["train", "val"]:
    loader = data_loader(device_batch_size, seq_len, split, tokenizer, device, lane=rank, num_lanes=world_size,
                         data_dir=data_dir or None)
    with autocast:
        results[split] = evaluate_bpb(model, loader, steps, token_bytes)
    print0(f"{split} bpb: {results[split]:.4f}")

if rank == 0:
    samples = []
    prompts = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
               "The opposite of hot is", "The planets of the solar system are:", "中国的首都是", "My favorite color is"]
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        with autocast:
            ids += list(model.generate(ids, max_new_tokens, temperature=0))
        samples.append(tokenizer.decode(ids[1:]))
        print0(f"  {samples[-1]!r}")
    from nanochat import report
    table = "| greedy completion |\n|---|\n" + "\n".join("| " + s.replace("|", "\\|").replace("\n", " ") + " |" for s in samples)
    report.log_section("Base model loss", config=user_config, table=table, stage="BASE",
                       metrics={"checkpoint": f"{checkpoint_dir} step {step}", "train bpb": results["train"],
                                "val bpb": results["val"], "tokens per split": steps * device_batch_size * seq_len * world_size},
                       summary={"val bpb": results["val"]})
compute_cleanup()
