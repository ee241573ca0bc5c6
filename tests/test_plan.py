"""
A GPU run sized to its data: `speedrun.sh --plan` for 8 GPUs against a loopback mirror (the d20
horizon and the shards that cover it) and with no source reachable (a model the offline corpus
covers); base_train refusing d20 on the offline corpus before its first step; and base_train
launched exactly as speedrun launches it on several GPUs (torchrun, `--`, --run with wandb offline).
Run: python -m pytest tests/test_plan.py -q
"""
import os
import re
import shlex
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import download, plan
from shard_server import ShardServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def speedrun_plan(env):
    r = subprocess.run(["bash", "speedrun.sh", "--plan"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def field(out, name):
    return re.search(rf"^{name}\s+(.*)$", out, re.M).group(1)


def number(text):
    return int(text.replace(",", ""))


@pytest.fixture
def mirror(tmp_path):
    for source in download.WEB_SOURCES:
        (tmp_path / source).mkdir()
        pq.write_table(pa.table({"text": ["a document"] * 4}), str(tmp_path / source / "shard_00000.parquet"))
    with ShardServer(str(tmp_path)) as server:
        yield server


def closed_port_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_eight_gpu_plan_fetches_the_shards_of_the_d20_horizon(mirror, tmp_path):
    out = speedrun_plan({"NANOCHAT_GPUS": "8", "NANOCHAT_DATA_URL": mirror.url, "NANOCHAT_BASE_DIR": str(tmp_path / "b")})
    assert field(out, "mode") == "gpu: 8 x H100 (assumed), web data"
    assert field(out, "depth").startswith("20 (width 1280, context 2048, vocab 65,536)")
    params = number(field(out, "parameters"))
    tokens = number(field(out, "tokens").split()[0])
    assert params == plan.model_size(20, 65536, 2048)[0] and tokens == 20 * params
    fetch = dict((s, int(n)) for n, s in re.findall(r"(\d+) (fineweb-edu(?:-zh)?)", field(out, "shards")))
    weights = {"fineweb-edu": 0.8, "fineweb-edu-zh": 0.2}
    for source, n in fetch.items():  # the train shards (all but shard 0) cover the source's share of the tokens
        assert (n - 1) * download.tokens_per_shard(source) >= weights[source] * tokens
        assert (n - 2) * download.tokens_per_shard(source) < weights[source] * tokens  # and not one more
    assert 0.9 < float(re.search(r"about ([0-9.]+)", field(out, "epochs")).group(1)) <= 1.0
    assert "h of pretraining" in field(out, "time")
    launch = field(out, "launch")
    assert "torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- configs/d20.py --depth=20" in launch
    assert f"--data_dir={tmp_path / 'b' / 'web_data'}" in launch


def test_with_no_source_reachable_the_plan_fits_the_offline_corpus(tmp_path):
    out = speedrun_plan({"NANOCHAT_GPUS": "8", "NANOCHAT_DATA_URL": closed_port_url(),
                         "NANOCHAT_BASE_DIR": str(tmp_path / "b")})
    assert field(out, "mode") == "gpu: 8 x H100 (assumed), offline corpus"
    assert "no web data:" in out and "no answer" in out and field(out, "shards") == "none to fetch"
    depth = int(field(out, "depth").split()[0])
    epochs = float(field(out, "epochs").split()[0])
    assert 1 <= depth < 20 and epochs <= 4.0
    # the next depth would not fit: the plan took the largest
    corpus = number(re.search(r"([0-9,]+) train tokens", out).group(1))
    assert 20 * plan.model_size(depth + 1, plan.OFFLINE_VOCAB, 2048)[1] > 4 * corpus
    assert "--num_iterations=" in field(out, "launch")


def test_base_train_d20_on_the_offline_corpus_stops_before_its_first_step(tokenizer_base_dir, default_data_dir):
    env = {**os.environ, "NANOCHAT_BASE_DIR": tokenizer_base_dir, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "scripts.base_train", "configs/d20.py", "--device_type=cpu",
                        f"--data_dir={default_data_dir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    epochs = float(re.search(r"this run would read its data ([0-9,.]+) times", out).group(1).replace(",", ""))
    assert epochs > 100  # ~560M parameters x 20 on ~12M tokens
    for fix in ("--sources=fineweb-edu --tokens=", "--depth=", "--num_iterations=", "--max_epochs="):
        assert fix in out
    assert not re.search(r"^step \d+/", out, re.M)  # not one step taken
    assert not os.path.exists(os.path.join(tokenizer_base_dir, "base_checkpoints", "d20"))  # nothing written
    # the depth it suggests does fit
    depth = int(re.search(r"--depth=(\d+) fits", out).group(1))
    r = subprocess.run([sys.executable, "-m", "scripts.base_train", "configs/d20.py", "--device_type=cpu",
                        f"--data_dir={default_data_dir}", f"--depth={depth}", "--num_iterations=1", "--eval_every=-1",
                        "--eval_tokens=2048", "--sample_every=-1", "--device_batch_size=1", "--max_seq_len=256",
                        "--total_batch_size=256"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def test_training_launches_as_speedrun_launches_it_on_several_gpus(tokenizer_base_dir, default_data_dir, tmp_path):
    out = speedrun_plan({"NANOCHAT_GPUS": "2", "WANDB_RUN": "plan-test", "NANOCHAT_DATA_URL": closed_port_url(),
                         "NANOCHAT_BASE_DIR": str(tmp_path / "b")})
    launch = shlex.split(field(out, "launch"))
    assert launch[0].endswith("/torchrun") and "--run=plan-test" in launch and launch[launch.index("-m") + 2] == "--"
    # the same command with a tiny model on CPU (torchrun is the venv's console script)
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch[1:]] + [
        "--depth=2", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=3",
        "--eval_every=-1", "--eval_tokens=256", "--sample_every=-1", "--device_type=cpu", f"--data_dir={default_data_dir}"]
    env = {**os.environ, "NANOCHAT_BASE_DIR": tokenizer_base_dir, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert re.search(r"^step 3/3 ", r.stdout, re.M) and "2 ranks" in r.stdout
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1  # rank 0 logged to wandb (offline) under the run name
