"""
Mid-training: teach the base model the chat format, the calculator tool and who it is, on a
mixture of conversations (loss on assistant tokens only).

    python -m scripts.mid_train --base_checkpoint=base_checkpoints/latest.pt
    python -m scripts.mid_train configs/cpu.py --data_path=my_chats.jsonl     # add your own conversations
    torchrun --nproc_per_node=2 -m scripts.mid_train -- --target_examples_per_step=64
    python -m scripts.mid_train --resume                                      # continue the newest checkpoint

Writes mid_checkpoints/<tag> (the base model's tag). Ctrl-C saves and exits; --resume continues.
"""
import os
import sys

if __package__ in (None, ""):  # also runnable as `python scripts/mid_train.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat.chat_data import finetune
from nanochat.common import print0
from nanochat.configurator import configure
from nanochat.tokenizer import get_tokenizer
from nanochat import tasks

# ----------------------------------------------------------------------------- defaults
run = "dummy"                  # wandb run name; "dummy" logs nowhere
use_dummy_wandb = False
device_type = ""               # cuda | mps | cpu; empty: autodetect
base_checkpoint = "base_checkpoints/latest.pt"
model_tag = ""                 # default: the base checkpoint's tag
max_seq_len = 0                # 0: the base model's
device_batch_size = 32         # rows of max_seq_len tokens per forward pass
target_examples_per_step = 64  # rows per optimizer step: sets gradient accumulation
num_iterations = -1            # -1: one epoch of the mixture
init_lr_frac = 1.0             # fraction of the pretraining learning rates to start from
embedding_lr = 0.2
unembedding_lr = 0.004
matrix_lr = 0.02
weight_decay = 0.0
grad_clip = 1.0                # 0 disables clipping
warmup_ratio = 0.0
warmdown_ratio = 0.2
final_lr_frac = 0.0
eval_every = 150               # val loss every N steps (and at the end); -1: never
eval_examples = 400            # val conversations (the tasks' test splits, never trained on)
save_every = -1                # -1: only at the end (and on Ctrl-C)
keep_last = 2
resume = False
compile = True                 # torch.compile on CUDA
seed = 42
max_memory_frac = 0.9
data_path = ""                 # user conversations (MiniMind JSONL), added to the mixture
generated_examples = 20000     # arithmetic and spelling problems each (generated, exact answers)
identity_examples = 1000       # who-are-you conversations (EN + ZH)
chitchat_examples = -1         # human small talk from chitchat-dataset; -1: all, 0: none
multiple_choice_examples = -1  # ARC/OBQA/... multiple choice (letters); -1: all, 0: none
user_config = configure(globals())
# -----------------------------------------------------------------------------


def mixture(split, n_generated, n_identity, n_chitchat, n_multiple_choice):
    """The mid-training mix of one split (train, or test for the val loss); a count of 0 drops a source."""
    sources = [tasks.Arithmetic(split, size=n_generated), tasks.Spelling(split, size=n_generated),
               tasks.Identity(split, size=n_identity)]
    if n_chitchat:
        sources.append(tasks.ChitChat(split, stop=n_chitchat if n_chitchat > 0 else None))
    if n_multiple_choice:
        sources.append(tasks.MultipleChoice(split, stop=n_multiple_choice if n_multiple_choice > 0 else None))
    return [s for s in sources if len(s)]


train_sources = mixture("train", generated_examples, identity_examples, chitchat_examples, multiple_choice_examples)
if data_path:
    train_sources.append(tasks.JSONLConversations(data_path))
print0("mid-training mix: " + ", ".join(f"{type(t).__name__} {len(t):,}" for t in train_sources))
val_sources = mixture("test", eval_examples, eval_examples, eval_examples if chitchat_examples else 0,
                      eval_examples if multiple_choice_examples else 0)
finetune("mid", base_checkpoint, "base", tasks.TaskMixture(train_sources, seed=seed),
         tasks.TaskMixture(val_sources, seed=seed), get_tokenizer(), globals(), user_config, pack=True)
