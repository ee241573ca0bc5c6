"""Tests for nanochat/common.py (device, DDP init, seeding, peak FLOPs, atomic writes, wandb stand-in).
Run: python -m pytest tests/test_common.py -q"""
import os
import random
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from nanochat.common import (DummyWandb, atomic_open, autodetect_device_type, compute_dtype, compute_init,
                             get_base_dir, get_dist_info, get_peak_flops, init_wandb, is_ddp, peak_flops_from_name,
                             print0, seed_everything)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


def test_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nc"))
    assert get_base_dir() == str(tmp_path / "nc") and (tmp_path / "nc").is_dir()


def test_autodetect_device_type_matches_torch():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert autodetect_device_type() == expected


def test_compute_dtype():
    assert compute_dtype("cpu") == torch.float32
    assert compute_dtype("mps") == torch.float32
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert compute_dtype("cuda") == torch.bfloat16


def test_compute_init_without_torchrun(no_torchrun_env):
    assert not is_ddp() and get_dist_info() == (False, 0, 0, 1)
    ddp, rank, local_rank, world_size, device = compute_init("cpu")
    assert (ddp, rank, local_rank, world_size) == (False, 0, 0, 1) and device == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="device_type"):
        compute_init("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            compute_init("cuda")


def test_print0_only_on_rank0(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    print0("hidden")
    monkeypatch.setenv("RANK", "0")
    print0("shown")
    assert capsys.readouterr().out == "shown\n"


def test_seed_everything_is_reproducible():
    seed_everything(123)
    a = (random.random(), torch.rand(2).tolist())
    seed_everything(123)
    assert (random.random(), torch.rand(2).tolist()) == a


def test_peak_flops_table():
    assert peak_flops_from_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_from_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_from_name("NVIDIA H200") == 989e12
    assert peak_flops_from_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_from_name("NVIDIA A10") == 125e12
    assert peak_flops_from_name("NVIDIA A10G") == 70e12
    assert peak_flops_from_name("NVIDIA L4") == 121e12
    assert peak_flops_from_name("NVIDIA L40S") == 362e12
    assert peak_flops_from_name("NVIDIA GeForce RTX 4090") == 165e12
    assert peak_flops_from_name("NVIDIA GeForce RTX 3090") == 71e12
    assert peak_flops_from_name("Some Future GPU") is None
    assert get_peak_flops("cpu") is None  # CPU MFU prints as n/a
    assert get_peak_flops(torch.device("cpu")) is None


def test_atomic_open(tmp_path):
    path = tmp_path / "f.txt"
    with atomic_open(str(path), "w") as f:
        f.write("one")
    with pytest.raises(RuntimeError):
        with atomic_open(str(path), "w") as f:
            f.write("two, half written")
            raise RuntimeError("crash")
    assert path.read_text() == "one" and os.listdir(tmp_path) == ["f.txt"]


def test_wandb_stand_in(monkeypatch):
    for run, dummy_flag, master in [("dummy", False, True), ("myrun", True, True), ("myrun", False, False)]:
        w = init_wandb(run, {"depth": 4}, master, use_dummy_wandb=dummy_flag)
        assert isinstance(w, DummyWandb)
        w.log({"loss": 1.0}, step=3)
        w.finish()
    # a real run name without wandb installed falls back to the stand-in instead of crashing
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert isinstance(init_wandb("myrun", {}, True), DummyWandb)


DDP_CHILD = textwrap.dedent("""
    import os, sys, json
    sys.path.insert(0, sys.argv[1])
    import torch, torch.distributed as dist
    from nanochat.common import compute_init, compute_cleanup, get_dist_info
    from nanochat.checkpoint_manager import save_checkpoint, load_checkpoint, find_last_step
    from nanochat.training import any_rank
    ddp, rank, local_rank, world_size, device = compute_init("cpu")
    assert get_dist_info() == (ddp, rank, local_rank, world_size)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    stop = any_rank(rank == 1, device)          # only rank 1 asks to stop: every rank must see it
    ckdir = sys.argv[2]
    save_checkpoint(ckdir, 7, {"w": torch.ones(3)} if rank == 0 else None, {"shard": torch.full((2,), float(rank))},
                    {"note": "ddp"}, rank=rank, keep_last=1)
    last = find_last_step(ckdir)              # after save returns, the checkpoint is complete on every rank
    _, optim, meta = load_checkpoint(ckdir, last, device, load_optimizer=True, rank=rank)
    print(json.dumps({"ddp": ddp, "rank": rank, "world_size": world_size, "sum": t.item(), "stop": stop,
                      "last": last, "shard": optim["shard"].tolist(), "files": sorted(meta["files"])}), flush=True)
    compute_cleanup()
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_init_two_process_gloo(tmp_path):
    import json
    script = tmp_path / "child.py"
    script.write_text(DDP_CHILD)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), REPO, str(tmp_path / "ck")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        finally:
            p.kill()
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    for rank, o in enumerate(outs):
        assert o["ddp"] is True and o["rank"] == rank and o["world_size"] == 2
        assert o["sum"] == 3.0 and o["stop"] is True and o["last"] == 7
        assert o["shard"] == [float(rank)] * 2
        assert o["files"] == ["model_000007.pt", "optim_000007_rank0.pt", "optim_000007_rank1.pt"]
