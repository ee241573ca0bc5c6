"""Shared basics: base directory, rank-0 printing. (Expanded by the pretraining work.)"""
import os


def get_base_dir() -> str:
    """Where data, tokenizer and checkpoints live: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)
