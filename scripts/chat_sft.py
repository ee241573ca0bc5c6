"""
Supervised fine-tuning: polish the mid-trained model on clean conversations (identity,
calculator arithmetic, spelling, some small talk, and your own data), loss on assistant tokens only.

    python -m scripts.chat_sft --mid_checkpoint=mid_checkpoints/latest.pt --device_batch_size=4
    python -m scripts.chat_sft --data_path=my_chats.jsonl      # add your own conversations
    torchrun --nproc_per_node=2 -m scripts.chat_sft
    python -m scripts.chat_sft --resume                        # continue the newest checkpoint
    python -m scripts.chat_sft --lora_rank=16                  # LoRA: train adapters only, saved alone too

Every eval_every steps: the val loss and greedy accuracies on held-out Arithmetic, Spelling and
Identity problems (generated with the engine, tools included). Writes chatsft_checkpoints/<tag>
(with --lora_rank: the merged model as usual, plus the adapter alone in adapter_<step>.pt).
"""
import os
import sys

if __package__ in (None, ""):  # also runnable as `python scripts/chat_sft.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat import tasks
from nanochat.chat_data import finetune
from nanochat.common import print0
from nanochat.configurator import configure
from nanochat.engine import Engine
from nanochat.tokenizer import get_tokenizer

# ----------------------------------------------------------------------------- defaults
run = "dummy"                  # wandb run name; "dummy" logs nowhere
use_dummy_wandb = False
device_type = ""               # cuda | mps | cpu; empty: autodetect
mid_checkpoint = "mid_checkpoints/latest.pt"
model_tag = ""                 # default: the mid checkpoint's tag
max_seq_len = 0                # 0: the model's
device_batch_size = 4          # conversations per forward pass
target_examples_per_step = 32  # conversations per optimizer step: sets gradient accumulation
num_iterations = -1            # -1: one epoch of the mixture
pack = False                   # False: one conversation per row (padded); True: packed like mid_train
init_lr_frac = 0.02            # fraction of the pretraining learning rates to start from
embedding_lr = 0.2
unembedding_lr = 0.004
matrix_lr = 0.02
weight_decay = 0.0
grad_clip = 1.0                # 0 disables clipping
warmup_ratio = 0.0
warmdown_ratio = 1.0           # linear decay over the whole run
final_lr_frac = 0.0
eval_every = 100               # val loss + task accuracies every N steps (and at the end); -1: never
eval_examples = 200            # val conversations (the tasks' test splits, never trained on)
eval_problems = 20             # held-out problems per task for the accuracies; 0: none
eval_max_tokens = 64
save_every = -1                # -1: only at the end (and on Ctrl-C)
keep_last = 2
resume = False
compile = True                 # torch.compile on CUDA
seed = 42
max_memory_frac = 0.9
data_path = ""                 # user conversations (MiniMind JSONL), added to the mixture
generated_examples = 2000      # arithmetic and spelling problems each
identity_examples = 500        # who-are-you conversations (EN + ZH)
chitchat_examples = 1000       # a slice of chitchat-dataset; 0: none
lora_rank = 0                  # > 0: train LoRA adapters of this rank only (base frozen); 0: full fine-tuning
lora_alpha = 32.0              # adapter scale alpha / rank
lora_targets = "attn.c_q,attn.c_v,mlp.c_fc"  # linear layers that get adapters (name patterns, comma-separated)
lora_lr = 1e-3                 # AdamW lr of the adapters (the *_lr / init_lr_frac above are for full fine-tuning)
user_config = configure(globals())
# -----------------------------------------------------------------------------


def mixture(split, n_generated, n_identity, n_chitchat):
    """The SFT mix of one split (train, or test for the val loss); a count of 0 drops a source."""
    sources = [tasks.Identity(split, size=n_identity), tasks.Arithmetic(split, size=n_generated),
               tasks.Spelling(split, size=n_generated)]
    if n_chitchat:
        sources.append(tasks.ChitChat(split, stop=n_chitchat))
    return [s for s in sources if len(s)]


tokenizer = get_tokenizer()
eval_tasks = {"arithmetic": tasks.Arithmetic("test", size=eval_problems), "spelling": tasks.Spelling("test", size=eval_problems),
              "identity": tasks.Identity("test", size=eval_problems)}


def task_accuracies(model, step):
    """Greedy generation (with the calculator) on each held-out task -> fraction correct."""
    if eval_problems <= 0:
        return {}
    engine = Engine(model, tokenizer)
    accuracies = {}
    for name, task in eval_tasks.items():
        correct = 0
        for conversation in task:
            prompt = tokenizer.render_for_completion(conversation)
            results, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=eval_max_tokens, temperature=0.0)
            correct += task.evaluate(conversation, tokenizer.decode(results[0]))
        accuracies[f"{name} acc"] = correct / len(task)
    return accuracies


train_sources = mixture("train", generated_examples, identity_examples, chitchat_examples)
if data_path:
    train_sources.append(tasks.JSONLConversations(data_path))
print0("SFT mix: " + ", ".join(f"{type(t).__name__} {len(t):,}" for t in train_sources))
val_sources = mixture("test", eval_examples, eval_examples, eval_examples if chitchat_examples else 0)
finetune("chatsft", mid_checkpoint, "mid", tasks.TaskMixture(train_sources, seed=seed),
         tasks.TaskMixture(val_sources, seed=seed), tokenizer, globals(), user_config,
         extra_eval=task_accuracies, pack=pack)
