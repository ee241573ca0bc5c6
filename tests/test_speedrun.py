"""
speedrun.sh: options and, in the slow suite, the whole smoke pipeline plus kill-and-resume.
CI runs `bash speedrun.sh --smoke-test` itself after the test suite (see .ci/run).
Run: python -m pytest tests/test_speedrun.py -q          (add -m slow for the end-to-end runs)
"""
import os
import signal
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def speedrun(*args, env=None, **kw):
    return subprocess.run(["bash", "speedrun.sh", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def test_help_lists_every_option_and_override():
    r = speedrun("--help")
    assert r.returncode == 0
    for word in ["--smoke-test", "--skip-pretrain", "--force-pretrain", "PRETRAIN_JSON", "SFT_JSON", "DPO_JSON",
                 "USE_MOE", "DEPTH", "NANOCHAT_BASE_DIR", "WANDB_RUN", "NANOCHAT_PRETRAINED_PATH"]:
        assert word in r.stdout


def test_unknown_option_is_refused_before_doing_anything(tmp_path):
    r = speedrun("--smok-test", env={"NANOCHAT_BASE_DIR": str(tmp_path)})
    assert r.returncode == 2 and "unknown option '--smok-test'" in r.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_smoke_run_end_to_end_then_kill_and_resume(tmp_path):
    base = tmp_path / "base"
    shared = os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    base.mkdir()
    for name in ("package_cache", "tiktoken_cache"):  # reuse the downloaded archives
        if os.path.isdir(os.path.join(shared, name)):
            os.symlink(os.path.join(shared, name), base / name)
    env = {"NANOCHAT_BASE_DIR": str(base)}
    r = speedrun("--smoke-test", env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = open(os.path.join(REPO, "report.md"), encoding="utf-8").read()
    assert "## Summary" in report and "| BASE |" in report and "| SFT |" in report
    marks = base / "smoke" / "speedrun" / "smoke" / "done"
    assert {"data", "tokenizer", "base_train", "mid_train", "chat_sft", "chat_dpo", "chat_rl"} <= set(os.listdir(marks))

    # kill the run in the middle of SFT; a re-run skips the finished stages and resumes SFT
    for stage in ("chat_sft", "chat_eval_sft", "chat_dpo", "chat_rl", "chat_eval_rl"):
        (marks / stage).unlink(missing_ok=True)
    proc = subprocess.Popen(["bash", "speedrun.sh", "--smoke-test"], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = ""
    deadline = time.time() + 600
    while time.time() < deadline:
        line = proc.stdout.readline()
        out += line
        if "[chat_sft]" in line and "====" in line:
            time.sleep(8)
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the stage saves a checkpoint and the run stops
            break
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert not (marks / "chat_sft").exists()
    r = speedrun("--smoke-test", env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "[base_train] finished in an earlier run, skipped" in r.stdout
    assert "[mid_train] finished in an earlier run, skipped" in r.stdout
    assert (marks / "chat_sft").exists()
