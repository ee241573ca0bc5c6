"""
Mid-training: teach the base model the chat format, the tools (calculator, python), multiple-choice
answers and who it is, on a mixture of conversations (loss on assistant tokens only).

    python -m scripts.mid_train --base_checkpoint=base_checkpoints/latest.pt
    python -m scripts.mid_train configs/cpu_mid.py --data_path=my_chats.jsonl   # add your own conversations
    torchrun --nproc_per_node=2 -m scripts.mid_train -- --target_examples_per_step=64
    python -m scripts.mid_train --resume                                        # continue the newest checkpoint

Mid-training is SFT on another mixture (more and larger: generated arithmetic, spelling, python tool use,
identity, all of chitchat, multiple choice; conversations packed into rows), from the base model,
at the pretraining learning rates. So it is the same loop: this file runs scripts/chat_sft.py with
mid-training's defaults (its `_mid` columns), which writes mid_checkpoints/<tag> (the base model's
tag). The options, the loop, Ctrl-C and --resume are chat_sft's.
"""
import os
import runpy

runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_sft.py"),
               init_globals={"_mid_training": True}, run_name="__main__")
