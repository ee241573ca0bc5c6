"""
The cleaning pass for a user's JSONL dump (MiniMind's formats, nanochat/records.py), before
training on it: drop bad rows and count why, write what is left, report what was kept.

    python -m nanochat.clean_data --kind=sft sft_mini_512.jsonl     # -> sft_mini_512.clean.jsonl
    python -m nanochat.clean_data --kind=pretrain a.jsonl b.jsonl --out_dir=clean/
    python -m nanochat.clean_data --kind=dpo dpo.jsonl --strict     # stop at the first bad line instead

Each row is dropped for the first reason that applies (records.REASONS: not UTF-8, malformed
JSON, not an object, missing or mistyped field, unknown role, bad turn order, empty content, no
assistant reply, think tags, mostly mojibake or control characters, longer than --max_tokens
with our tokenizer, exact duplicate after whitespace normalisation, with --near_dup a MinHash
near duplicate). Writes <out> (default IN.clean.jsonl) atomically, the kept lines as they were
(reasoning markup rewritten into our <think> form); <out stem>.report.json with the counts, the
first line numbers of each reason, token-length percentiles and the language mix; a token-length
histogram <out stem>.lengths.png; and a section of report.md. A file that is not UTF-8, not JSONL
at all, or empty after cleaning is an error, never an empty output.

Streaming in constant memory: the main process reads the file in CHUNK_BYTES pieces cut at
newlines, a pool of workers (all cores) parses and checks them, and the main process takes the
results back in file order (at most 2 chunks per worker in flight), so line numbers are exact and
the output keeps the input's order. It alone decides duplicates (dedup.KeySet: 8 bytes a row).
"""
import argparse
import collections
import json
import multiprocessing
import os
import re
import sys
import time
from typing import NamedTuple

import numpy as np

from nanochat.common import DataError, atomic_open, get_base_dir, open_input, parse_jsonl_line
from nanochat.dedup import BANDS, KeySet, minhash_bands, near_duplicates, text_key
from nanochat.records import (QUALITY_REASONS, REASONS, check_conversation, check_preference_pair, check_text_row)

KINDS = ("pretrain", "sft", "dpo", "reasoning")
DEFAULT_MAX_TOKENS = {"pretrain": 0, "sft": 2048, "dpo": 2048, "reasoning": 2048}  # 0: no length limit
CHUNK_BYTES = 4 << 20     # bytes a worker cleans at a time
MAX_GARBAGE = 0.3         # drop a row when more than this fraction of its characters is garbage
LENGTH_SAMPLE = 16        # without a length limit, tokenize 1 row in this many for the percentiles
FIRST_LINES = 10          # line numbers kept per reason in the report
NOT_TEXT = 0.5            # more than this fraction of bad lines: the file is not UTF-8 / JSONL at all
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
# mojibake (UTF-8 read as Latin-1; '锟斤拷' is U+FFFD read as GBK), replacement and control characters
_GARBAGE = re.compile(r"[\u00c2-\u00f4][\u0080-\u00bf]+|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]|锟斤拷")
# any character that can start a garbage match: one search for it is 4x faster than the match itself
_GARBAGE_START = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00c2-\u00f4\ufffd锟]")


class Settings(NamedTuple):
    kind: str
    max_tokens: int        # 0: no limit
    tokenizer_dir: str     # "" when there is none: lengths in characters
    near_dup: bool
    max_garbage: float
    length_sample: int


# -----------------------------------------------------------------------------
# One row (in the workers)

def parse_record(kind, raw, where):
    """A raw line -> (record in our form, the object as read, its messages or None), or None for a
    blank line; DataError (with its reason) for a bad one."""
    obj = parse_jsonl_line(raw, where)
    if obj is None:
        return None
    if kind == "pretrain":
        text = check_text_row(obj, where)
        if not text.strip():
            raise DataError(f'{where}: field "text" is empty', "empty_content")
        return text, obj, None
    if kind == "dpo":
        pair = check_preference_pair(obj, where)
        chosen, rejected = (pair[side]["conversations"] for side in ("chosen", "rejected"))
        if chosen[-1]["content"] == rejected[-1]["content"]:
            raise DataError(f"{where}: field 'rejected': the same reply as 'chosen'", "identical_pair")
        return pair, obj, chosen + rejected[-1:]
    conversation = check_conversation(obj, where, require_think=kind == "reasoning")
    return conversation, obj, conversation["conversations"]


def content_text(content):
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content)


def record_texts(record, messages):
    """(text for the duplicate key: roles included, text of the content alone: for the checks and
    the language mix) of a record."""
    if messages is None:
        return record, record
    contents = [content_text(m["content"]) for m in messages]
    return "\n".join(f"<{m['role']}> {c}" for m, c in zip(messages, contents)), "\n".join(contents)


def record_length(kind, record, tokenizer):
    """Tokens the record takes: a document with its BOS; a conversation rendered; a pair's longer side."""
    if kind == "pretrain":
        return len(tokenizer.encode(record)) + 1
    render = lambda conv: len(tokenizer.render_conversation(conv, max_tokens=1 << 62)[0])
    if kind == "dpo":
        return max(render(record["chosen"]), render(record["rejected"]))
    return render(record)


def garbage_fraction(text):
    return sum(map(len, _GARBAGE.findall(text))) / max(1, len(text))


def rewritten_line(kind, record, obj):
    """The line to write when the record differs from what was read (think markup), else None."""
    if kind not in ("sft", "reasoning"):
        return None
    key = "conversations" if "conversations" in obj else "messages"
    if all(new is old for new, old in zip(record["conversations"], obj[key])):
        return None
    return json.dumps({**obj, key: record["conversations"]}, ensure_ascii=False).encode("utf-8")


_worker = {}  # settings and tokenizer of this process (set by init_worker)


def init_worker(settings):
    from nanochat.tokenizer import RustBPETokenizer
    _worker["settings"] = settings
    _worker["tokenizer"] = RustBPETokenizer.from_directory(settings.tokenizer_dir) if settings.tokenizer_dir else None


def clean_chunk(chunk, first_lineno, path):
    """Check every line of a chunk. Returns the candidate rows (those that pass every check but the
    duplicate ones, which need the whole file: the main process does them) with their keys,
    lengths and character counts, and the dropped lines by reason."""
    s, tokenizer = _worker["settings"], _worker["tokenizer"]
    lines = chunk.split(b"\n")
    if chunk.endswith(b"\n"):
        lines.pop()
    out = {"lines": len(lines), "blank": 0, "rows": [], "keys": [], "bands": [], "lengths": [], "chars": [], "cjk": [],
           "rewritten": {}, "drops": collections.defaultdict(list), "messages": {}}

    def drop(lineno, reason, message):
        out["drops"][reason].append(lineno)
        out["messages"].setdefault(reason, message)
    for rel, raw in enumerate(lines):
        lineno, where = first_lineno + rel, f"{path}: line {first_lineno + rel}"
        try:
            parsed = parse_record(s.kind, raw, where)
        except DataError as e:
            drop(lineno, e.reason, str(e))
            continue
        if parsed is None:
            out["blank"] += 1
            continue
        record, obj, messages = parsed
        key_text, text = record_texts(record, messages)
        if _GARBAGE_START.search(text) and garbage_fraction(text) > s.max_garbage:
            drop(lineno, "garbage_text", f"{where}: {100 * garbage_fraction(text):.0f}% mojibake, replacement or control "
                                         f"characters (more than --max_garbage={s.max_garbage})")
            continue
        length = -1
        if tokenizer is not None and (s.max_tokens > 0 or lineno % s.length_sample == 0):
            length = record_length(s.kind, record, tokenizer)
        elif tokenizer is None:
            length = len(text)
        if s.max_tokens > 0 and tokenizer is not None and length > s.max_tokens:
            drop(lineno, "too_long", f"{where}: {length} tokens, more than --max_tokens={s.max_tokens}")
            continue
        rewritten = rewritten_line(s.kind, record, obj)
        if rewritten is not None:
            out["rewritten"][rel] = rewritten
        out["rows"].append(rel)
        out["keys"].append(text_key(key_text))
        if s.near_dup:
            out["bands"].append(minhash_bands(text))
        out["lengths"].append(length)
        out["chars"].append(len(text))
        out["cjk"].append(0 if text.isascii() else len(text) - len(_CJK.sub("", text)))
    for name in ("rows", "lengths", "chars", "cjk"):
        out[name] = np.array(out[name], dtype=np.int64)
    out["keys"] = np.array(out["keys"], dtype=np.uint64)
    out["bands"] = np.array(out["bands"], dtype=np.uint64).reshape(-1, BANDS)
    out["drops"] = dict(out["drops"])
    return out


# -----------------------------------------------------------------------------
# The file (in the main process)

def read_chunks(f, chunk_bytes=CHUNK_BYTES):
    """(chunk, first line number) pieces of about chunk_bytes, cut after a newline."""
    lineno, rest = 1, b""
    while True:
        block = f.read(chunk_bytes)
        if not block:
            break
        data = rest + block
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # one line longer than a chunk: keep reading
            rest = data
            continue
        yield data[:cut], lineno
        lineno += data.count(b"\n", 0, cut)
        rest = data[cut:]
    if rest:
        yield rest, lineno


def in_order(chunks, path, pool, window):
    """(chunk, first line, result) for each chunk, in file order, at most `window` in flight."""
    def finish(chunk, first, job):
        return chunk, first, job.get() if pool else clean_chunk(*job)
    pending = collections.deque()
    for chunk, first in chunks:
        args = (chunk, first, path)
        pending.append((chunk, first, pool.apply_async(clean_chunk, args) if pool else args))
        if len(pending) >= window:
            yield finish(*pending.popleft())
    for job in pending:
        yield finish(*job)


class LengthHistogram:
    """Counts of row lengths in constant memory: exact below EXACT, then PER_OCTAVE bins an octave
    (1% wide), so the percentiles read from it are exact for rows under 65,536 tokens."""
    EXACT, PER_OCTAVE, OCTAVES = 1 << 16, 64, 32

    def __init__(self):
        self.counts = np.zeros(self.EXACT + self.PER_OCTAVE * self.OCTAVES, dtype=np.int64)
        self.total = self.sum = self.max = 0

    def add(self, values):
        values = np.asarray(values, dtype=np.int64)
        if not len(values):
            return
        bins = values.copy()
        big = values >= self.EXACT
        bins[big] = self.EXACT + (self.PER_OCTAVE * np.log2(values[big] / self.EXACT)).astype(np.int64)
        self.counts += np.bincount(np.minimum(bins, len(self.counts) - 1), minlength=len(self.counts))
        self.total, self.sum, self.max = self.total + len(values), self.sum + int(values.sum()), max(self.max, int(values.max()))

    def value(self, b):
        return int(b) if b < self.EXACT else int(self.EXACT * 2 ** ((b - self.EXACT) / self.PER_OCTAVE))

    def percentile(self, q):
        return self.value(np.searchsorted(np.cumsum(self.counts), max(1, int(np.ceil(q * self.total)))))

    def summary(self):
        if not self.total:
            return {}
        return {**{f"p{q}": self.percentile(q / 100) for q in (50, 90, 95, 99)}, "max": self.max,
                "mean": round(self.sum / self.total, 1)}

    def plot(self, path, unit, limit):
        """The histogram as a PNG on log-spaced bins, with the length limit and the median marked."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
        nonzero = np.flatnonzero(self.counts)
        values = np.array([self.value(b) for b in nonzero], dtype=np.float64)
        edges = np.unique(np.geomspace(max(1.0, values.min()), values.max() + 1, 60).round())
        fig = Figure(figsize=(8, 3.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.hist(values, bins=edges if len(edges) > 1 else 1, weights=self.counts[nonzero], color="#4a78b5")
        ax.set_xscale("log")
        ax.axvline(self.percentile(0.5), color="black", lw=1, ls=":", label=f"median {self.percentile(0.5):,}")
        if limit:
            ax.axvline(limit, color="tab:red", lw=1.5, label=f"--max_tokens {limit:,}")
        ax.set_xlabel(f"{unit} per row (log scale)")
        ax.set_ylabel("rows kept")
        ax.set_title(f"{self.total:,} rows, p90 {self.percentile(0.9):,}, max {self.max:,} {unit}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png")


class Tally:
    """What the main process counts while a file is cleaned (constant memory)."""

    def __init__(self):
        self.lines = self.blank = self.kept = self.bytes = self.chars = self.cjk = 0
        self.removed, self.first_lines, self.examples = collections.Counter(), {}, {}
        self.lengths, self.cjk_rows = LengthHistogram(), [0, 0, 0]  # rows with no, some, mostly CJK

    def drop(self, reason, linenos, example):
        if not len(linenos):
            return
        self.removed[reason] += len(linenos)
        first = self.first_lines.setdefault(reason, [])
        first += [int(n) for n in linenos[:FIRST_LINES - len(first)]]
        self.examples.setdefault(reason, example)

    def add_kept(self, lengths, chars, cjk):
        self.kept += len(chars)
        self.lengths.add(lengths[lengths >= 0])
        self.chars, self.cjk = self.chars + int(chars.sum()), self.cjk + int(cjk.sum())
        share = cjk / np.maximum(chars, 1)
        self.cjk_rows = [self.cjk_rows[0] + int((cjk == 0).sum()), self.cjk_rows[1] + int(((cjk > 0) & (share < 0.5)).sum()),
                         self.cjk_rows[2] + int((share >= 0.5).sum())]


def take(tally, chunk, first, result, path, seen, near_seen, strict, dst):
    """Fold one chunk's result into the tally: drop duplicates, write the kept lines in order."""
    if strict:  # the first malformed line of the chunk (chunks arrive in order) stops the run
        bad = [(lines[0], reason) for reason, lines in result["drops"].items() if reason not in QUALITY_REASONS]
        if bad:
            raise DataError(result["messages"][min(bad)[1]])
    for reason, lines in result["drops"].items():
        tally.drop(reason, lines, result["messages"][reason])
    tally.lines, tally.blank, tally.bytes = tally.lines + result["lines"], tally.blank + result["blank"], tally.bytes + len(chunk)
    rows, keep = result["rows"], seen.add_new(result["keys"])
    dups = first + rows[~keep]
    tally.drop("duplicate", dups, f"{path}: line {dups[0] if len(dups) else 0}: the same as an earlier row")
    if near_seen is not None and keep.any():
        near = np.flatnonzero(keep)[near_duplicates(result["bands"][keep], near_seen)]
        keep[near] = False
        tally.drop("near_duplicate", first + rows[near],
                   f"{path}: line {first + rows[near[0]] if len(near) else 0}: nearly the same as an earlier row")
    tally.add_kept(result["lengths"][keep], result["chars"][keep], result["cjk"][keep])
    if keep.any():
        lines = chunk.split(b"\n")
        dst.write(b"\n".join(result["rewritten"].get(r) or lines[r].rstrip(b"\r") for r in rows[keep].tolist()) + b"\n")


def check_is_text(path, tally):
    """A file that is mostly not UTF-8, or mostly not JSON objects, is the wrong file: stop."""
    rows = tally.lines - tally.blank
    for reasons, what, hint in [(("not_utf8",), "do not decode as UTF-8", "convert it first, e.g. iconv -f GBK -t UTF-8"),
                                (("malformed_json", "not_an_object"), "are not JSON objects",
                                 "JSONL has one JSON object per line (a JSON array converts with jq -c '.[]')")]:
        bad = sum(tally.removed[r] for r in reasons)
        if rows and bad > NOT_TEXT * rows:
            example = next(tally.examples[r] for r in reasons if r in tally.examples)
            raise DataError(f"{path}: not {'UTF-8 text' if reasons == ('not_utf8',) else 'JSONL'}: {bad:,} of the first "
                            f"{rows:,} lines {what} ({example}); {hint}")


def _stem(path):
    return path[:-len(".jsonl")] if path.endswith(".jsonl") else path


def default_output(path, out_dir=None):
    out = _stem(path) + ".clean.jsonl"
    return os.path.join(out_dir, os.path.basename(out)) if out_dir else out


def report_path(out):
    return _stem(out) + ".report.json"


def histogram_path(out):
    return _stem(out) + ".lengths.png"


def cleaning_summary(path):
    """The headline numbers of the cleaning report of `path`, a file nanochat.clean_data wrote;
    None when there is no report beside it or the file changed since."""
    try:
        with open(report_path(path), encoding="utf-8") as f:
            report = json.load(f)
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or (report.get("output_bytes"), report.get("output_mtime_ns")) != (st.st_size, st.st_mtime_ns):
        return None
    return {k: report.get(k) for k in ("kind", "input", "kept", "removed_total", "removed")} | {"report": report_path(path)}


# -----------------------------------------------------------------------------
# Driver

def clean_file(path, out, settings, seen, near_seen=None, strict=False, pool=None, window=1, chunk_bytes=CHUNK_BYTES):
    """Clean one file into `out` (atomically); returns the report (also written beside `out`).
    `seen` / `near_seen`: the keys of earlier rows (shared by the files of one run)."""
    if os.path.abspath(path) == os.path.abspath(out):
        raise DataError(f"{path}: --out must differ from the input")
    t0, size, tally, last_print = time.time(), os.path.getsize(path), Tally(), time.time()
    with open_input(path) as f, atomic_open(out, "wb") as dst:
        for chunk, first, result in in_order(read_chunks(f, chunk_bytes), path, pool, window):
            take(tally, chunk, first, result, path, seen, near_seen, strict, dst)
            check_is_text(path, tally)
            if time.time() - last_print > 10:
                last_print, rate = time.time(), tally.bytes / (time.time() - t0)
                print(f"{path}: {tally.bytes / 1e6:,.0f} of {size / 1e6:,.0f} MB ({100 * tally.bytes / max(size, 1):.0f}%) | "
                      f"{rate / 1e6:.1f} MB/s | kept {tally.kept:,} | removed {sum(tally.removed.values()):,} | "
                      f"eta {(size - tally.bytes) / max(rate, 1):.0f}s", flush=True)
        if tally.lines == tally.blank:
            raise DataError(f"{path}: empty file (no JSON lines)")
        if not tally.kept:
            raise DataError(f"{path}: nothing left after cleaning: all {sum(tally.removed.values()):,} rows removed ("
                            + ", ".join(f"{r} {n:,}" for r, n in tally.removed.most_common()) + ")")
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)  # atomic_open's temp file is private; the output is an ordinary file
    report = build_report(path, out, settings, tally, strict, near_seen is not None, time.time() - t0)
    with atomic_open(report_path(out), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    if tally.lengths.total:
        tally.lengths.plot(histogram_path(out), report["length"]["unit"], settings.max_tokens if settings.tokenizer_dir else 0)
    return report


def build_report(path, out, settings, tally, strict, near_dup, seconds):
    st = os.stat(out)
    unit = "tokens" if settings.tokenizer_dir else "characters"
    if not settings.tokenizer_dir:
        note = "no tokenizer: lengths in characters" + (", length check SKIPPED" if settings.max_tokens else "")
    elif settings.max_tokens:
        note = f"every row tokenized; longer than {settings.max_tokens} tokens removed"
    else:
        note = f"no length limit; 1 row in {settings.length_sample} tokenized for the percentiles"
    return {
        "input": path, "output": out, "kind": settings.kind, "strict": strict, "near_dup": near_dup,
        "kept": tally.kept, "removed_total": sum(tally.removed.values()), "removed": dict(tally.removed.most_common()),
        "lines": tally.lines, "blank_lines": tally.blank,
        "first_lines": {r: tally.first_lines[r] for r, _ in tally.removed.most_common()},
        "examples": {r: tally.examples[r] for r, _ in tally.removed.most_common()},
        "length": {"unit": unit, "max_tokens": settings.max_tokens or None, "measured_rows": tally.lengths.total,
                   "note": note, **tally.lengths.summary(),
                   "histogram": os.path.basename(histogram_path(out)) if tally.lengths.total else None},
        "language": {"cjk_share": round(tally.cjk / max(1, tally.chars), 4), "rows_no_cjk": tally.cjk_rows[0],
                     "rows_some_cjk": tally.cjk_rows[1], "rows_mostly_cjk": tally.cjk_rows[2]},
        "tokenizer": settings.tokenizer_dir or None, "input_bytes": tally.bytes, "output_bytes": st.st_size,
        "output_mtime_ns": st.st_mtime_ns, "seconds": round(seconds, 2), "mb_per_s": round(tally.bytes / 1e6 / max(seconds, 1e-9), 1),
    }


def reasons_table(report):
    rows = ["| reason | rows | first lines | what it means |", "|---|---|---|---|"]
    for reason, n in report["removed"].items():
        rows.append(f"| {reason} | {n:,} | {', '.join(map(str, report['first_lines'][reason]))} | {REASONS[reason]} |")
    return "\n".join(rows)


def print_report(report):
    removed = ", ".join(f"{r} {n:,}" for r, n in report["removed"].items())
    print(f"{report['input']}: kept {report['kept']:,}, removed {report['removed_total']:,}" + (f" ({removed})" if removed else "")
          + f" -> {report['output']}")
    for reason, n in report["removed"].items():
        print(f"  {reason:<20} {n:>10,}  lines {', '.join(map(str, report['first_lines'][reason]))}")
    length, language = report["length"], report["language"]
    if length.get("p50") is not None:
        print(f"  {length['unit']} per row: p50 {length['p50']:,} | p90 {length['p90']:,} | p99 {length['p99']:,} | "
              f"max {length['max']:,} ({length['note']})")
    print(f"  CJK {100 * language['cjk_share']:.1f}% of characters; rows mostly CJK {language['rows_mostly_cjk']:,}, "
          f"some {language['rows_some_cjk']:,}, none {language['rows_no_cjk']:,} | {report['mb_per_s']} MB/s")
    print(f"  report {report_path(report['output'])}")


def log_report_section(report):
    from nanochat import report as report_card
    length = report["length"]
    metrics = {"input": report["input"], "output": report["output"], "kept": report["kept"],
               "removed": report["removed_total"], **{f"removed: {r}": n for r, n in report["removed"].items()},
               **{f"{length['unit']} {k}": length[k] for k in ("p50", "p90", "p99", "max") if k in length},
               "CJK share": report["language"]["cjk_share"], "MB/s": report["mb_per_s"]}
    plot = histogram_path(report["output"])
    report_card.log_section(f"Data cleaning: {os.path.basename(report['input'])}", metrics=metrics,
                            table=reasons_table(report) if report["removed"] else None, plots=[plot],
                            config={"kind": report["kind"], "max_tokens": length["max_tokens"], "strict": report["strict"],
                                    "near_dup": report["near_dup"], "length note": length["note"]})


def resolve_tokenizer(tokenizer_dir, max_tokens):
    """The tokenizer dir to count tokens with, or "" (said out loud) when there is none."""
    explicit = bool(tokenizer_dir)
    tokenizer_dir = tokenizer_dir or os.path.join(get_base_dir(), "tokenizer")
    if os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        return tokenizer_dir
    if explicit:
        raise DataError(f"{tokenizer_dir}: no tokenizer there (tokenizer.json missing)")
    print(f"no tokenizer in {tokenizer_dir}: lengths are counted in characters"
          + (f" and the --max_tokens={max_tokens} length check is SKIPPED (train one first with "
             f"python -m scripts.tok_train, or pass --tokenizer_dir)" if max_tokens else ""))
    return ""


def main(argv=None):
    parser = argparse.ArgumentParser(description="Clean a JSONL dump before training on it (see the module doc).")
    parser.add_argument("inputs", nargs="+", help="JSONL files; rows repeating an earlier file's are duplicates too")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--out", default=None, help="output file (one input); default IN.clean.jsonl")
    parser.add_argument("--out_dir", default=None, help="write <name>.clean.jsonl of each input here")
    parser.add_argument("--max_tokens", type=int, default=None,
                        help=f"drop rows longer than this with our tokenizer; 0: no limit (default {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--tokenizer_dir", default="", help="default <base>/tokenizer")
    parser.add_argument("--strict", action="store_true", help="the first malformed line is an error (file, line, field)")
    parser.add_argument("--near_dup", action="store_true", help="also drop MinHash near duplicates (slower)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes checking rows (1: in this one)")
    parser.add_argument("--max_garbage", type=float, default=MAX_GARBAGE)
    parser.add_argument("--length_sample", type=int, default=LENGTH_SAMPLE)
    parser.add_argument("--chunk_mb", type=float, default=CHUNK_BYTES / (1 << 20))
    args = parser.parse_args(argv)
    if args.out and len(args.inputs) > 1:
        parser.error("--out names one output: use --out_dir for several inputs")
    max_tokens = DEFAULT_MAX_TOKENS[args.kind] if args.max_tokens is None else args.max_tokens
    settings = Settings(args.kind, max_tokens, resolve_tokenizer(args.tokenizer_dir, max_tokens), args.near_dup,
                        args.max_garbage, max(1, args.length_sample))
    seen, near_seen = KeySet(), KeySet() if args.near_dup else None
    pool = multiprocessing.Pool(args.workers, init_worker, (settings,)) if args.workers > 1 else None
    if pool is None:
        init_worker(settings)
    try:
        for path in args.inputs:
            out = args.out or default_output(path, args.out_dir)
            report = clean_file(path, out, settings, seen, near_seen, args.strict, pool, 2 * args.workers,
                                int(args.chunk_mb * (1 << 20)))
            print_report(report)
            log_report_section(report)
    finally:
        if pool is not None:
            pool.terminate()  # the work is done (or failed): stop the workers and reap them
            pool.join()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DataError as e:
        sys.exit(f"error: {e}")
