"""Tests for nanochat/training.py (shared training-loop pieces). Run: python -m pytest tests/test_training.py -q"""
import json
import os
import random
import signal
import time

import pytest
import torch

from nanochat.training import (ETA, GracefulExit, MemoryGuard, any_rank, format_hms, format_step_line,
                               get_rng_state, lr_multiplier, muon_momentum, plot_loss_curve, set_rng_state,
                               write_json_atomic)


def test_lr_schedule_shape():
    n = 100
    lrm = [lr_multiplier(s, n, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1) for s in range(n + 1)]
    assert lrm[0] == pytest.approx(0.1)                      # warm-up starts small and rises linearly
    assert all(b > a for a, b in zip(lrm[:10], lrm[1:10]))
    assert lrm[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in lrm[10:81])                # constant
    assert all(b < a for a, b in zip(lrm[80:], lrm[81:]))   # warm-down falls monotonically
    assert lrm[n] == pytest.approx(0.1)                      # to final_lr_frac at the horizon
    assert lrm[90] == pytest.approx(0.5 + 0.5 * 0.1)
    # no warm-up, no warm-down: constant 1
    assert {lr_multiplier(s, 50, 0.0, 0.0, 0.0) for s in range(51)} == {1.0}


def test_muon_momentum():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)


def test_format_hms():
    assert format_hms(0) == "0:00:00"
    assert format_hms(61) == "0:01:01"
    assert format_hms(3 * 3600 + 5) == "3:00:05"
    assert format_hms(100 * 3600) == "100:00:00"
    assert format_hms(None) == "n/a" and format_hms(float("inf")) == "n/a"


def test_step_line_format():
    line = format_step_line(42, 1000, 3.456789, 0.5, 12345.6, 0.4512, 83.0, eta=1860.0)
    assert line.startswith("step 0042/1000 (  4.2%)")
    for part in ("loss 3.456789", "lrm 0.500", "tok/s 12,346", "mfu 45.12%", "elapsed 0:01:23", "eta 0:31:00"):
        assert part in line, part
    assert "mfu n/a" in format_step_line(1, 10, 1.0, 1.0, 10.0, None, 1.0)
    # default ETA: linear extrapolation of elapsed time
    assert "eta 0:00:09" in format_step_line(1, 10, 1.0, 1.0, 10.0, None, 1.0)


def test_eta_ignores_warmup_steps_and_tracks_ema():
    eta = ETA(total_steps=100, skip_steps=3, beta=0.5)
    for dt in (60.0, 30.0, 10.0):  # compile warm-up: ignored
        eta.update(dt)
    assert eta.seconds_left(3) is None
    assert "eta n/a" in format_step_line(3, 100, 1.0, 1.0, 1.0, None, 100.0, eta)
    eta.update(1.0)
    assert eta.seconds_left(4) == pytest.approx(96.0)
    eta.update(3.0)  # EMA 0.5 * 1 + 0.5 * 3 = 2
    assert eta.seconds_left(5) == pytest.approx(2.0 * 95)
    assert "eta 0:03:10" in format_step_line(5, 100, 1.0, 1.0, 1.0, None, 100.0, eta)
    assert eta.seconds_left(100) == 0


def test_graceful_exit_sets_flag_on_sigint_and_restores_handlers():
    before_int, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulExit(repeat_window_s=0.2) as g:
        assert not g.requested and g.reason() is None
        os.kill(os.getpid(), signal.SIGINT)
        assert g.requested and g.reason() == "SIGINT received"
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C delivered twice: still a clean stop
        assert g.requested
        time.sleep(0.3)
        with pytest.raises(KeyboardInterrupt):  # a later second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before_int and signal.getsignal(signal.SIGTERM) is before_term


def test_graceful_exit_sigterm():
    g = GracefulExit()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # repeated SIGTERM only keeps the flag set
        assert g.requested and g.reason() == "SIGTERM received"
    finally:
        g.close()


def test_any_rank_without_ddp():
    assert any_rank(True) is True and any_rank(False) is False


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs Linux /proc")
def test_memory_guard():
    assert MemoryGuard(0.99).check() is None                 # this test process is far below 99% of RAM
    msg = MemoryGuard(1e-6).check()                          # any process exceeds a tiny fraction
    assert msg is not None and "max_memory_frac" in msg and "GiB" in msg
    msg = MemoryGuard(0.99, min_available_frac=1.01).check()  # available can never exceed 101% of RAM
    assert msg is not None and "available" in msg
    assert MemoryGuard(0).check() is None                    # 0 disables the guard
    g = MemoryGuard(0.5)
    assert 0 < g.rss_bytes() < g.total and 0 < g.available_bytes() <= g.total


def test_rng_state_round_trip(tmp_path):
    state = get_rng_state()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    expected = (random.random(), torch.rand(3))
    set_rng_state(torch.load(path, weights_only=True))  # loadable with weights_only
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])
    np = pytest.importorskip("numpy")
    set_rng_state(state)
    a = np.random.rand()
    set_rng_state(state)
    assert np.random.rand() == a


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "config.json"
    write_json_atomic(str(path), {"depth": 4, "lr": 0.02, "tags": ("a",)})
    assert json.loads(path.read_text()) == {"depth": 4, "lr": 0.02, "tags": ["a"]}

    class Unserializable:
        def __str__(self):
            raise RuntimeError("cannot serialize")

    with pytest.raises(RuntimeError):
        write_json_atomic(str(path), {"depth": 8, "bad": Unserializable()})
    assert json.loads(path.read_text())["depth"] == 4       # a failed write leaves the old file
    assert os.listdir(path.parent) == ["config.json"]


def test_plot_loss_curve(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "loss.png"
    steps = list(range(1, 301))
    losses = [10.0 / (s ** 0.5) + 0.01 * (s % 7) for s in steps]
    assert plot_loss_curve(str(path), steps, losses, "base d4: train loss")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert os.listdir(tmp_path) == ["loss.png"]
    assert plot_loss_curve(str(path), steps, losses, "with val", val_steps=[0, 150, 300], val_values=[3.0, 2.0, 1.5])
    assert path.read_bytes() != data
    # stopped before the first step: nothing to plot, nothing written, no error in the save path
    assert plot_loss_curve(str(tmp_path / "empty.png"), [], [], "empty") is False
    assert not (tmp_path / "empty.png").exists()


GRACEFUL_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
import torch
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.training import GracefulExit
graceful = GracefulExit()
step = 0
while True:
    if graceful.reason():  # as a training loop does at the top of every step
        save_checkpoint(sys.argv[2], step, {"w": torch.full((4,), float(step))}, None, {"stopped": graceful.reason()})
        print("saved", step, flush=True)
        break
    time.sleep(0.01)  # "train"
    step += 1
    if step == 5:
        print("ready", flush=True)
graceful.close()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_makes_a_loop_save_and_exit_cleanly(tmp_path, sig):
    import subprocess
    import sys
    from nanochat.checkpoint_manager import find_last_step, load_checkpoint
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "loop.py"
    script.write_text(GRACEFUL_CHILD)
    proc = subprocess.Popen([sys.executable, str(script), repo, str(tmp_path / "ck")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0
    step = find_last_step(str(tmp_path / "ck"))
    assert out.strip().endswith(f"saved {step}") and step >= 5 and "received" in out
    _, _, meta = load_checkpoint(str(tmp_path / "ck"), step, "cpu")
    assert meta["stopped"] == f"{signal.Signals(sig).name} received"
