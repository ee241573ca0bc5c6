"""Tests for nanochat/checkpoint_manager.py. Run: python -m pytest tests/test_checkpoint.py -q"""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.checkpoint_manager import (CheckpointError, check_compatible, find_last_step, find_latest_model_tag,
                                         load_checkpoint, resolve_checkpoint, save_checkpoint)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def model_state(step):
    return {"wte.weight": torch.full((8, 4), float(step)), "h.0.w": torch.arange(12.0).reshape(3, 4) + step}


def save(ckdir, step, keep_last=None, rank=0, **meta):
    meta = {"model_config": {"vocab_size": 8, "n_layer": 1}, "tokenizer_hash": "abc", "val_bpb": 1.5, **meta}
    return save_checkpoint(str(ckdir), step, model_state(step), {"adam": {"step": torch.tensor(step)}, "pos": [step, 3]},
                           meta, rank=rank, keep_last=keep_last)


def test_round_trip(tmp_path):
    ckdir = tmp_path / "base_checkpoints" / "d1"
    written = save(ckdir, 200, config={"depth": 1, "run": "dummy"})
    names = sorted(os.listdir(ckdir))
    assert names == ["meta_000200.json", "model_000200.pt", "optim_000200_rank0.pt"]  # no temp files left
    meta_on_disk = json.loads((ckdir / "meta_000200.json").read_text())
    assert meta_on_disk == written
    assert meta_on_disk["step"] == 200 and meta_on_disk["config"] == {"depth": 1, "run": "dummy"}
    assert set(meta_on_disk["files"]) == {"model_000200.pt", "optim_000200_rank0.pt"}
    assert meta_on_disk["files"]["model_000200.pt"]["bytes"] == os.path.getsize(ckdir / "model_000200.pt")
    model, optim, meta = load_checkpoint(str(ckdir), 200, "cpu", load_optimizer=True)
    for k, v in model_state(200).items():
        assert torch.equal(model[k], v)
    assert optim["adam"]["step"].item() == 200 and optim["pos"] == [200, 3]
    assert meta["val_bpb"] == 1.5 and meta["checkpoint_file"].endswith("model_000200.pt")
    _, optim, _ = load_checkpoint(str(ckdir), 200, "cpu")
    assert optim is None
    # saving again with the loaded meta does not store the in-memory checkpoint_file key
    save_checkpoint(str(ckdir), 300, model_state(300), None, meta)
    assert "checkpoint_file" not in json.loads((ckdir / "meta_000300.json").read_text())


def test_truncated_model_file_is_refused_by_name(tmp_path):
    save(tmp_path, 10)
    path = tmp_path / "model_000010.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(tmp_path), 10, "cpu")
    assert str(path) in str(e.value) and "truncated" in str(e.value)
    with pytest.raises(CheckpointError, match="truncated"):
        cm.verify_checkpoint(str(tmp_path), 10)


def test_flipped_bytes_are_refused_by_name(tmp_path):
    save(tmp_path, 10)
    for name in ("model_000010.pt", "optim_000010_rank0.pt"):
        path = tmp_path / name
        original = path.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(str(tmp_path), 10, "cpu", load_optimizer=True)
        assert str(path) in str(e.value) and "corrupt" in str(e.value)
        with pytest.raises(CheckpointError, match=f"{name}: corrupt"):
            cm.verify_checkpoint(str(tmp_path), 10)  # checks the optim files too, without unpickling
        path.write_bytes(original)
    load_checkpoint(str(tmp_path), 10, "cpu", load_optimizer=True)  # restored: loads again
    assert cm.verify_checkpoint(str(tmp_path), 10)["step"] == 10
    import hashlib
    assert cm.sha256_file(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_meta_or_optim(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20)
    os.unlink(tmp_path / "meta_000020.json")
    assert find_last_step(str(tmp_path)) == 10           # step 20 is incomplete: ignored
    assert cm.list_steps(str(tmp_path)) == [10]
    with pytest.raises(CheckpointError, match="meta_000020.json: missing meta"):
        load_checkpoint(str(tmp_path), 20, "cpu")
    os.unlink(tmp_path / "optim_000010_rank0.pt")
    with pytest.raises(CheckpointError, match="optim_000010_rank0.pt: missing file"):
        load_checkpoint(str(tmp_path), 10, "cpu", load_optimizer=True)
    with pytest.raises(CheckpointError, match="optim_000010_rank1.pt: not recorded"):
        load_checkpoint(str(tmp_path), 10, "cpu", load_optimizer=True, rank=1)
    assert find_last_step(str(tmp_path / "nothing_here")) is None


def test_unreadable_meta(tmp_path):
    save(tmp_path, 10)
    (tmp_path / "meta_000010.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta_000010.json: unreadable"):
        load_checkpoint(str(tmp_path), 10, "cpu")


def test_keep_last(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step, keep_last=2)
    (tmp_path / "model_000035.pt").write_bytes(b"torn leftover")  # incomplete, newer than the cutoff: kept
    save(tmp_path, 40, keep_last=2)
    assert cm.list_steps(str(tmp_path)) == [30, 40]
    assert not any(n.startswith(("model_000010", "model_000020", "optim_000020", "meta_000020")) for n in os.listdir(tmp_path))
    assert (tmp_path / "model_000035.pt").exists()
    save(tmp_path, 50, keep_last=1)
    assert sorted(os.listdir(tmp_path)) == ["meta_000050.json", "model_000050.pt", "optim_000050_rank0.pt"]


def test_resave_same_step_replaces_it(tmp_path):
    save(tmp_path, 10)
    save_checkpoint(str(tmp_path), 10, model_state(99), None, {})
    model, _, meta = load_checkpoint(str(tmp_path), 10, "cpu")
    assert model["wte.weight"][0, 0].item() == 99 and "optim_000010_rank0.pt" not in meta["files"]


def test_stale_temp_files_are_removed(tmp_path):
    stale = tmp_path / ".model_000010.pt.abc123.tmp999999999"  # a pid that cannot exist
    tmp_path.mkdir(exist_ok=True)
    stale.write_bytes(b"half written")
    save(tmp_path, 10)
    assert not stale.exists()


def test_find_latest_model_tag(base):
    stage = base / "base_checkpoints"
    save(stage / "d4", 100)
    save(stage / "d2", 50)
    os.utime(stage / "d4" / "meta_000100.json", (time.time() - 100, time.time() - 100))
    assert find_latest_model_tag(str(stage)) == "d2"
    (stage / "d9").mkdir()  # a tag dir with nothing complete is ignored
    save(stage / "d9", 7)
    os.unlink(stage / "d9" / "meta_000007.json")
    assert find_latest_model_tag(str(stage)) == "d2"


def test_resolve_checkpoint_every_form(base):
    stage = base / "base_checkpoints"
    save(stage / "d4", 100)
    save(stage / "d4", 200)
    save(stage / "d2", 50)
    os.utime(stage / "d2" / "meta_000050.json", (time.time() - 100, time.time() - 100))
    d4, d2 = str(stage / "d4"), str(stage / "d2")
    for arg in ("latest", "latest.pt"):
        assert resolve_checkpoint(arg, default_stage="base") == (d4, 200)
    for arg in ("base_checkpoints", "base_checkpoints/latest", "base_checkpoints/latest.pt",
                "base_checkpoints/d4", "base_checkpoints/d4/", "base_checkpoints/d4/latest", "base_checkpoints/d4/latest.pt"):
        assert resolve_checkpoint(arg) == (d4, 200), arg
    assert resolve_checkpoint("base_checkpoints/d4/model_000100.pt") == (d4, 100)
    assert resolve_checkpoint("base_checkpoints/d4/meta_000100.json") == (d4, 100)
    assert resolve_checkpoint("base_checkpoints/d2") == (d2, 50)
    assert resolve_checkpoint(str(stage / "d4" / "model_000100.pt")) == (d4, 100)  # absolute
    assert resolve_checkpoint(str(stage)) == (d4, 200)
    assert resolve_checkpoint("d2", default_stage="base") == (d2, 50)                 # bare tag
    assert resolve_checkpoint("d4/model_000100.pt", default_stage="base_checkpoints") == (d4, 100)
    # mid stage has its own latest
    save(base / "mid_checkpoints" / "d4", 30)
    assert resolve_checkpoint("mid_checkpoints/latest.pt") == (str(base / "mid_checkpoints" / "d4"), 30)
    assert resolve_checkpoint("latest", default_stage="mid") == (str(base / "mid_checkpoints" / "d4"), 30)


def test_resolve_checkpoint_errors_list_what_exists(base):
    save(base / "base_checkpoints" / "d4", 100)
    for arg, default_stage in [("base_checkpoints/d9", None), ("base_checkpoints/d4/model_000300.pt", None),
                               ("chatsft_checkpoints/latest", None), ("latest", "chatsft"), ("latest", None)]:
        with pytest.raises(CheckpointError) as e:
            resolve_checkpoint(arg, default_stage=default_stage)
        msg = str(e.value)
        assert arg in msg and "base_checkpoints/d4: steps 100" in msg, msg
    # an incomplete step named explicitly says so
    save(base / "base_checkpoints" / "d4", 300)
    os.unlink(base / "base_checkpoints" / "d4" / "meta_000300.json")
    with pytest.raises(CheckpointError, match="step 300 is not a complete checkpoint"):
        resolve_checkpoint("base_checkpoints/d4/model_000300.pt")


def test_check_compatible(tmp_path, monkeypatch):
    save(tmp_path, 10)
    _, _, meta = load_checkpoint(str(tmp_path), 10, "cpu")
    check_compatible(meta, expected_model_config={"vocab_size": 8, "n_layer": 1})  # matches: no error
    with pytest.raises(CheckpointError) as e:
        check_compatible(meta, expected_model_config={"vocab_size": 65536})
    assert "model_000010.pt" in str(e.value) and "vocab size mismatch" in str(e.value) and "65536" in str(e.value)
    with pytest.raises(CheckpointError, match=r"model_config\['n_layer'\] mismatch"):
        check_compatible(meta, expected_model_config={"n_layer": 2})

    class Tokenizer:  # what check_compatible asks of a tokenizer: its vocab size and fingerprint
        def __init__(self, vocab_size):
            self.vocab_size = vocab_size

        def get_vocab_size(self):
            return self.vocab_size
    import nanochat.tokenizer
    monkeypatch.setattr(nanochat.tokenizer, "tokenizer_fingerprint", lambda tok: "def")
    check_compatible({**meta, "tokenizer_hash": None}, Tokenizer(8))  # no recorded hash: the vocab decides
    with pytest.raises(CheckpointError, match="model_000010.pt: vocab size mismatch"):
        check_compatible(meta, Tokenizer(9))
    with pytest.raises(CheckpointError, match="model_000010.pt: tokenizer mismatch"):
        check_compatible({**meta, "tokenizer_hash": "abc"}, Tokenizer(8))
    check_compatible({**meta, "tokenizer_hash": "def"}, Tokenizer(8))


def test_build_model_round_trip(tmp_path):
    gpt = pytest.importorskip("nanochat.gpt")
    torch.manual_seed(0)
    config = gpt.config_from_depth(1, vocab_size=32, sequence_len=16)
    model = gpt.GPT(config)
    model.init_weights()
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # as saved from a compiled model
    save_checkpoint(str(tmp_path), 5, state, None, {"model_config": config.__dict__})
    loaded, meta = cm.build_model(str(tmp_path), 5, "cpu", phase="eval")
    assert not loaded.training and meta["step"] == 5
    idx = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        model.eval()
        assert torch.allclose(model(idx), loaded(idx))
    # a meta whose config does not fit the weights is refused by name
    bad = dict(config.__dict__, n_embd=128)
    save_checkpoint(str(tmp_path), 6, state, None, {"model_config": bad})
    with pytest.raises(CheckpointError, match="model_000006.pt"):
        cm.build_model(str(tmp_path), 6, "cpu")


# A launcher that imports torch once, then forks savers and SIGKILLs each at a random moment
# (fork keeps the test fast: one torch import instead of one per round). The launcher runs no
# tensor math itself, so forking after `import torch` is safe.
KILL_LAUNCHER = textwrap.dedent("""
    import json, os, random, signal, sys, time
    sys.path.insert(0, sys.argv[1])
    import torch
    from nanochat.checkpoint_manager import find_last_step, list_steps, save_checkpoint, verify_checkpoint
    ckdir, rounds, rng = sys.argv[2], int(sys.argv[3]), random.Random(int(sys.argv[4]))
    start = 0
    for round_ in range(rounds):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the saver: save forever, one byte down the pipe per complete checkpoint
            os.close(rfd)
            torch.set_num_threads(1)
            step = start
            while True:
                step += 1
                save_checkpoint(ckdir, step, {"w": torch.full((3_000_000,), float(step))},
                                {"m": torch.full((1_000_000,), float(step))}, {"note": "kill test"}, keep_last=2)
                os.write(wfd, b"x")
        os.close(wfd)
        assert os.read(rfd, 1) == b"x"          # at least one save of this round completed
        time.sleep(rng.uniform(0.0, 0.3))       # then die at a random moment
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(rfd)
        leftovers = sorted(n for n in os.listdir(ckdir) if not n.startswith("meta_"))
        last = find_last_step(ckdir)
        assert last is not None and last > start, (start, last)
        for step in list_steps(ckdir):
            verify_checkpoint(ckdir, step)      # sizes and sha256 of every complete step hold
        print(json.dumps({"round": round_, "last": last, "files": leftovers}), flush=True)
        start = last                            # "resume": the next saver continues after it
""")


def test_sigkill_mid_save_leaves_previous_checkpoint_loadable(tmp_path):
    ckdir = tmp_path / "ck"
    script = tmp_path / "launcher.py"
    script.write_text(KILL_LAUNCHER)
    out = subprocess.run([sys.executable, str(script), REPO, str(ckdir), "6", "1234"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rounds = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rounds) == 6
    for step in cm.list_steps(str(ckdir)):                     # every complete step loads with the right data
        model, optim, meta = load_checkpoint(str(ckdir), step, "cpu", load_optimizer=True)
        assert meta["step"] == step
        assert bool((model["w"] == step).all()) and bool((optim["m"] == step).all())
    last = find_last_step(str(ckdir))
    assert last == rounds[-1]["last"]
    save_checkpoint(str(ckdir), last + 1, {"w": torch.zeros(1)}, None, {}, keep_last=2)
    assert not [n for n in os.listdir(ckdir) if ".tmp" in n]       # killed saves' temp files are cleaned up


def test_crash_at_each_phase_of_a_save(tmp_path, monkeypatch):
    """Deterministic companion of the SIGKILL test: fail the k-th rename of a save (model, optim, meta)."""
    import nanochat.common as common
    real_replace = os.replace
    for k in range(3):
        ckdir = tmp_path / f"k{k}"
        save(ckdir, 1)
        calls = []

        def failing_replace(src, dst):
            calls.append(dst)
            if len(calls) > k:
                raise OSError("simulated crash")
            return real_replace(src, dst)

        monkeypatch.setattr(common.os, "replace", failing_replace)
        with pytest.raises(OSError, match="simulated crash"):
            save(ckdir, 2)
        monkeypatch.setattr(common.os, "replace", real_replace)
        assert find_last_step(str(ckdir)) == 1, k          # the half-saved step 2 is never picked up
        model, _, _ = load_checkpoint(str(ckdir), 1, "cpu", load_optimizer=True)
        assert model["wte.weight"][0, 0].item() == 1
        assert not [n for n in os.listdir(ckdir) if ".tmp" in n]  # the failed write removed its temp file


def test_check_usable_cli(base):
    """`python -m nanochat.checkpoint_manager check` (speedrun's --skip-pretrain): a good checkpoint
    prints its model file; a vocab or tokenizer mismatch and a corrupted file exit 1 saying why."""
    gpt = pytest.importorskip("nanochat.gpt")
    from nanochat.tokenizer import RustBPETokenizer, tokenizer_fingerprint
    tok = RustBPETokenizer.train_from_iterator(["hello world, the cat sat on the mat"] * 20, 300)
    tok.save(str(base / "tokenizer"))
    config = gpt.config_from_depth(1, vocab_size=tok.get_vocab_size(), sequence_len=16)
    model = gpt.GPT(config)
    model.init_weights()
    good = base / "base_checkpoints" / "d1"
    save_checkpoint(str(good), 3, model.state_dict(), None,
                    {"model_config": config.__dict__, "tokenizer_hash": tokenizer_fingerprint(tok)})

    def check(arg):
        return subprocess.run([sys.executable, "-m", "nanochat.checkpoint_manager", "check", arg, "--stage=base"],
                              capture_output=True, text=True, cwd=REPO, env={**os.environ, "NANOCHAT_BASE_DIR": str(base)})

    r = check("base_checkpoints/d1")
    assert r.returncode == 0 and r.stdout.strip() == str(good / "model_000003.pt"), r.stderr
    other = dict(config.__dict__, vocab_size=config.vocab_size + 1)
    save_checkpoint(str(base / "base_checkpoints" / "vocab"), 1, gpt.GPT(gpt.GPTConfig(**other)).state_dict(), None,
                    {"model_config": other})
    r = check("base_checkpoints/vocab")
    assert r.returncode == 1 and "vocab size mismatch" in r.stderr
    save_checkpoint(str(base / "base_checkpoints" / "tok"), 1, model.state_dict(), None,
                    {"model_config": config.__dict__, "tokenizer_hash": "0" * 64})
    r = check("base_checkpoints/tok")
    assert r.returncode == 1 and "tokenizer mismatch" in r.stderr
    with open(good / "model_000003.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    r = check("base_checkpoints/d1")
    assert r.returncode == 1 and "model_000003.pt" in r.stderr
    assert check("base_checkpoints/none").returncode == 1
