"""
Web shards (nanochat.download) against a loopback server in fineweb-edu's layout: parallel, resumable,
checked before they count, retried on drops and 5xx, loud on 404 and on a server that does not
answer; and the loader reading a downloaded two-source mixture interleaved by weight.
Run: python -m pytest tests/test_download.py -q
"""
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset, download
from nanochat.dataloader import data_loader
from nanochat.dataset import parquets_iter_batched, row_groups
from shard_server import ShardServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory, default_data_dir):
    """12 shards of real text in fineweb-edu's layout (a `text` column, row groups of 32 documents)."""
    root = tmp_path_factory.mktemp("mirror")
    texts = [t for batch in parquets_iter_batched("train", data_dir=default_data_dir) for t in batch][:N * 96]
    for i in range(N):
        pq.write_table(pa.table({"text": texts[i * 96:(i + 1) * 96]}), str(root / f"shard_{i:05d}.parquet"),
                       row_group_size=32)
    return root


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def fetch(url, out, *extra, workers=4):
    return dataset.main(["--sources=fineweb-edu", f"--num_shards={N}", f"--base_url={url}", f"--output_dir={out}",
                         f"--workers={workers}", *extra])


def assert_complete(out, served):
    folder = out / "fineweb-edu"
    names = sorted(os.listdir(folder))
    assert names == [f"shard_{i:05d}.parquet" for i in range(N)], names  # and no temp file left
    for name in names:
        assert download.check_shard(str(folder / name)) is None
        assert sha(folder / name) == sha(served / name)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(download, "RETRY_WAIT", 0.05)


def test_drop_and_500s_are_retried_and_a_rerun_fetches_nothing(served, tmp_path, capsys):
    faults = {"shard_00003.parquet": ["drop"], "shard_00007.parquet": ["500", "500"]}
    with ShardServer(str(served), faults) as server:
        fetch(server.url, tmp_path / "data")
        gets = server.full_gets()
        assert_complete(tmp_path / "data", served)
        assert gets.count("shard_00003.parquet") == 2 and gets.count("shard_00007.parquet") == 3
        assert all(gets.count(f"shard_{i:05d}.parquet") == 1 for i in range(N) if i not in (3, 7))
        out = capsys.readouterr().out
        assert "connection dropped after" in out and "HTTP 500" in out
        assert f"shards {N}/{N}" in out and "MB/s" in out and "eta" in out  # the progress line
        fetch(server.url, tmp_path / "data")
        assert server.full_gets() == gets  # the second run fetched nothing
        assert f"{N}/{N} shards present, fetching 0" in capsys.readouterr().out


def test_a_killed_run_restarts_with_only_the_missing_shards(served, tmp_path):
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "nanochat.dataset", "--sources=fineweb-edu", f"--num_shards={N}", f"--output_dir={out}",
           "--workers=1"]
    with ShardServer(str(served), delay=0.3) as server:
        proc = subprocess.Popen(cmd + [f"--base_url={server.url}"], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        folder = out / "fineweb-edu"
        deadline = time.time() + 60
        while time.time() < deadline:
            done = [n for n in os.listdir(folder) if n.endswith(".parquet")] if folder.exists() else []
            if len(done) >= 5:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kept = sorted(n for n in os.listdir(folder) if n.endswith(".parquet"))
        assert len(kept) >= 5 and all(download.check_shard(str(folder / n)) is None for n in kept)
        before = len(server.full_gets())
        server.delay = 0.0
        fetch(server.url, out)
        again = server.full_gets()[before:]
    assert sorted(again) == sorted(f"shard_{i:05d}.parquet" for i in range(N) if f"shard_{i:05d}.parquet" not in kept)
    assert len(again) == N - len(kept) and len(kept) <= 6  # 5 shards, maybe a 6th finished before the kill
    assert_complete(out, served)


def test_bad_shards_are_named_and_fetched_again(served, tmp_path, capsys):
    no_text = tmp_path / "no_text"
    no_text.mkdir()
    pq.write_table(pa.table({"content": ["x"] * 5}), str(no_text / "shard_00004.parquet"))
    faults = {"shard_00002.parquet": ["garbage"], "shard_00005.parquet": ["truncate"]}
    with ShardServer(str(served), faults) as server:
        fetch(server.url, tmp_path / "data")
        out = capsys.readouterr().out
        assert "shard_00002.parquet: not a readable parquet file" in out
        assert "shard_00005.parquet: not a readable parquet file" in out
        assert_complete(tmp_path / "data", served)
        # a shard broken on disk after the fact (truncated, or lacking the text column) is named and replaced
        folder = tmp_path / "data" / "fineweb-edu"
        data = open(folder / "shard_00009.parquet", "rb").read()
        open(folder / "shard_00009.parquet", "wb").write(data[:len(data) // 3])
        os.replace(no_text / "shard_00004.parquet", folder / "shard_00004.parquet")
        before = len(server.full_gets())
        fetch(server.url, tmp_path / "data")
        assert sorted(server.full_gets()[before:]) == ["shard_00004.parquet", "shard_00009.parquet"]
        out = capsys.readouterr().out
        assert "shard_00009.parquet: not a readable parquet file" in out and "fetching it again" in out
        assert "shard_00004.parquet: no `text` column (columns: content)" in out
    assert_complete(tmp_path / "data", served)
    # a shard the server always serves without text is an error naming it, once its retries are spent
    for i in (0, 1):
        pq.write_table(pa.table({"content": ["x"] * 5}), str(no_text / f"shard_0000{i}.parquet"))
    with ShardServer(str(no_text)) as server:
        with pytest.raises(download.DownloadError, match=r"shard_0000[01].parquet: no `text` column .*gave up"):
            dataset.main(["--sources=fineweb-edu", "--num_shards=2", f"--base_url={server.url}",
                          f"--output_dir={tmp_path / 'bad'}"])


def test_404_stops_with_the_url_and_keeps_what_is_done(served, tmp_path):
    with ShardServer(str(served), {"shard_00009.parquet": ["404"]}) as server:
        with pytest.raises(download.DownloadError, match=rf"{server.url}/shard_00009.parquet: HTTP 404"):
            fetch(server.url, tmp_path / "data", workers=1)
    folder = tmp_path / "data" / "fineweb-edu"
    names = sorted(os.listdir(folder))
    assert names == [f"shard_{i:05d}.parquet" for i in range(9)]  # one worker: 0..8 done, nothing after, no temp file
    assert all(download.check_shard(str(folder / n)) is None for n in names)


def test_a_server_that_does_not_answer_fails_in_seconds(tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (the kernel does) but never answers
    try:
        for url, extra in [(f"http://127.0.0.1:{port}", []),
                           (f"http://127.0.0.1:{silent.getsockname()[1]}", ["--timeout=1"])]:
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "nanochat.dataset", "--sources=fineweb-edu", "--num_shards=4",
                                f"--base_url={url}", f"--output_dir={tmp_path / 'data'}", *extra],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
            assert r.returncode == 1 and f"{url}/shard_00000.parquet: no answer" in r.stderr, r.stderr
            assert time.time() - t0 < 15
    finally:
        silent.close()


def test_probe_and_mixture_errors(served):
    with ShardServer(str(served)) as server:
        r = subprocess.run([sys.executable, "-m", "nanochat.dataset", "--sources=fineweb-edu", "--probe",
                            f"--base_url={server.url}"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "reachable" in r.stdout
    assert download.parse_mixture("fineweb-edu:3,fineweb-edu-zh:1") == {"fineweb-edu": 0.75, "fineweb-edu-zh": 0.25}
    with pytest.raises(ValueError, match="unknown web source 'fineweb'"):
        download.parse_mixture("fineweb")
    with pytest.raises(ValueError, match="must be > 0"):
        download.parse_mixture("fineweb-edu:0")


def test_a_downloaded_mixture_is_read_interleaved_by_weight(served, tmp_path):
    # the same 12 shards as two sources, at 3:1; the second holds fewer shards than its weight needs
    mirror = tmp_path / "mirror"
    for source, count in [("fineweb-edu", 9), ("fineweb-edu-zh", 3)]:
        (mirror / source).mkdir(parents=True)
        for i in range(count):
            os.symlink(served / f"shard_{i:05d}.parquet", mirror / source / f"shard_{i:05d}.parquet")
    out = tmp_path / "data"
    with ShardServer(str(mirror)) as server:
        dataset.main(["--sources=fineweb-edu:0.75,fineweb-edu-zh:0.25", "--num_shards=9,3", f"--base_url={server.url}",
                      f"--output_dir={out}"])
    order = row_groups("train", str(out))
    sources = [s for _, _, s in order]
    # fineweb-edu-zh has 2 train shards x 3 row groups: the epoch ends when they are used up, with
    # three times their bytes of fineweb-edu (weights 3:1), to within one row group
    size = {(p, rg): n for p in {p for p, _, _ in order} for rg, n in enumerate(dataset.row_group_bytes(p))}
    by_source = {s: sum(size[(p, rg)] for p, rg, t in order if t == s) for s in ("fineweb-edu", "fineweb-edu-zh")}
    assert sources.count("fineweb-edu-zh") == 6 and 12 <= sources.count("fineweb-edu") < 24
    assert abs(by_source["fineweb-edu"] - 3 * by_source["fineweb-edu-zh"]) <= 3 * max(size.values())
    assert "fineweb-edu-zh" in sources[:3] and "fineweb-edu-zh" in sources[-6:]  # spread over the epoch
    assert {p for p, _, s in order if s == "fineweb-edu-zh"} == {str(out / "fineweb-edu-zh" / f"shard_0000{i}.parquet")
                                                                 for i in (1, 2)}
    assert {s for _, _, s in row_groups("val", str(out))} == {"fineweb-edu", "fineweb-edu-zh"}  # shard 0 of each

    class Chars:
        def get_bos_token_id(self):
            return 0

        def encode(self, texts, prepend=None):
            return [[prepend] + [ord(c) % 1000 + 1 for c in t] for t in texts]
    x, y, state = next(data_loader(2, 64, "train", Chars(), data_dir=str(out)))
    assert x.shape == (2, 64) and state["row_group"] == 0
    # a mixture whose source has no shard on disk is an error naming it, not an empty epoch
    os.rename(out / "fineweb-edu-zh", tmp_path / "elsewhere")
    with pytest.raises(dataset.DataError, match="source fineweb-edu-zh has no train shard"):
        row_groups("train", str(out))


def test_interleave_tracks_the_weights_by_bytes():
    streams = {"a": [("a", i, 100) for i in range(30)], "b": [("b", i, 300) for i in range(4)]}
    order = dataset.interleave(streams, {"a": 0.5, "b": 0.5})
    taken_a = sum(1 for _, _, s in order if s == "a")
    assert taken_a in (12, 13) and sum(1 for _, _, s in order if s == "b") == 4  # 1200 bytes of each, +- a row group
    assert dataset.interleave({"a": [], "b": streams["b"]}, {"a": 0.5, "b": 0.5}) == []


def test_building_into_a_download_dir_is_refused(tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "mixture.json").write_text('{"sources": {"fineweb-edu": 1.0}, "shards": {"fineweb-edu": 2}}')
    (tmp_path / "a.txt").write_text("one document\n\nanother document\n\na third\n\nand a fourth one")
    with pytest.raises(dataset.DataError, match="holds downloaded web shards"):
        dataset.main([f"--input={tmp_path / 'a.txt'}", f"--output_dir={tmp_path / 'web'}"])
