"""
base_train end to end on CPU: DDP (torchrun, gloo) == gradient accumulation, interrupt + resume ==
an uninterrupted run, clear errors for bad options. Each test runs the real script in a subprocess
on a tiny model, a small slice of the real corpus and a tokenizer trained in-process.
Run: python -m pytest tests/test_base_train.py -q
"""
import os
import re
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.dataset import parquets_iter_batched
from nanochat.tokenizer import RustBPETokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth=2", "--max_seq_len=32", "--device_batch_size=2", "--num_iterations=8", "--eval_every=4",
        "--eval_tokens=256", "--sample_every=-1", "--save_every=-1", "--grad_clip=1.0"]
LOSS_RE = re.compile(r"^step (\d+)/\d+ .*\| loss ([0-9.]+) ", re.M)
VAL_RE = re.compile(r"^step (\d+) \| val bpb ([0-9.]+)", re.M)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, default_data_dir):
    """A base dir with ~600 real documents and a 512-token tokenizer trained on them."""
    base = tmp_path_factory.mktemp("nanochat_base")
    data = base / "base_data"
    data.mkdir()
    for split, n in [("train", 600), ("val", 60)]:
        texts = []
        for batch in parquets_iter_batched(split, data_dir=default_data_dir):
            texts.extend(t[:3000] for t in batch)
            if len(texts) >= n:
                break
        table = pa.table({"text": texts[:n], "source": ["test"] * n})
        pq.write_table(table, str(data / f"{split}_00000.parquet"), row_group_size=200)
    train_texts = [t for b in parquets_iter_batched("train", data_dir=str(data)) for t in b]
    RustBPETokenizer.train_from_iterator(train_texts, 512).save(str(base / "tokenizer"))  # + token_bytes.pt
    return str(base)


def run(base_dir, args, torchrun=False, timeout=300):
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "scripts.base_train", *args]
    else:
        cmd = [sys.executable, "-m", "scripts.base_train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"base_train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def losses(stdout):
    return {int(s): float(v) for s, v in LOSS_RE.findall(stdout)}


def test_two_ranks_match_one_rank_with_double_accumulation(base_dir):
    # 2 x 32 x 2 ranks = 128 tokens: accumulation 1 under torchrun, 2 in one process
    one = losses(run(base_dir, TINY + ["--total_batch_size=128", "--model_tag=one"]))
    two = losses(run(base_dir, TINY + ["--total_batch_size=128", "--model_tag=two"], torchrun=True))
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for step in one:  # same data, same math; only the float summation order differs
        assert abs(one[step] - two[step]) < 1e-4 * max(1.0, one[step]), (step, one[step], two[step])
    assert one[8] < one[1]  # and it learns


def test_interrupt_and_resume_matches_uninterrupted(base_dir):
    full = run(base_dir, TINY + ["--total_batch_size=128", "--model_tag=full"])
    # second run: SIGINT once step 4 is logged -> checkpoint + clean exit; then --resume
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *TINY, "--total_batch_size=128",
                             "--model_tag=split"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    first = ""
    for line in proc.stdout:
        first += line
        if line.startswith("step 4/8"):
            proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, first[-3000:]  # saved, but not finished: pipelines must see that
    assert "stopping at step" in first and "saved" in first
    stopped_at = int(re.search(r"stopping at step (\d+)", first).group(1))
    assert 4 <= stopped_at < 8
    second = run(base_dir, TINY + ["--total_batch_size=128", "--model_tag=split", "--resume"])
    assert "resumed from" in second
    a, b = losses(full), {**losses(first), **losses(second)}
    assert sorted(b) == list(range(1, 9))
    for step in range(stopped_at + 1, 9):  # the steps after the resume see the same model, data and RNG
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    val = lambda out: {int(s): v for s, v in VAL_RE.findall(out)}
    assert val(full)[8] == val(second)[8]  # the final val bpb is identical


def test_bad_key_lists_the_valid_keys(base_dir):
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir}
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", "--dpeth=3"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    message = proc.stdout + proc.stderr
    assert "dpeth" in message and "depth" in message and "device_batch_size" in message


def test_checkpoint_layout_and_artifacts(base_dir):
    run(base_dir, TINY + ["--total_batch_size=64", "--model_tag=artifacts", "--num_iterations=4"])
    ckpt = os.path.join(base_dir, "base_checkpoints", "artifacts")
    names = set(os.listdir(ckpt))
    assert {"model_000004.pt", "meta_000004.json", "optim_000004_rank0.pt", "config.json", "loss_curve.png"} <= names
    out = subprocess.run([sys.executable, "-m", "scripts.base_loss", "--checkpoint=base_checkpoints/artifacts",
                          "--split_tokens=256", "--device_batch_size=2", "--max_new_tokens=4"], cwd=REPO,
                         env={**os.environ, "NANOCHAT_BASE_DIR": base_dir}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"train bpb: \d+\.\d+", out.stdout) and re.search(r"val bpb: \d+\.\d+", out.stdout)
