"""
speedrun.sh: options and, in the slow suite, the whole smoke pipeline plus kill-and-resume.
CI runs `bash speedrun.sh --smoke-test` itself after the test suite (see .ci/run).
Run: python -m pytest tests/test_speedrun.py -q          (add -m slow for the end-to-end runs)
"""
import os
import shutil
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
    for stage in ("chat_sft", "chat_eval_sft", "chat_dpo", "chat_eval_dpo", "chat_rl", "chat_eval_rl"):
        (marks / stage).unlink(missing_ok=True)
    shutil.rmtree(base / "smoke" / "chatsft_checkpoints")  # as if SFT had not run yet
    proc = subprocess.Popen(["bash", "speedrun.sh", "--smoke-test"], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out, in_sft = "", False
    deadline = time.time() + 600
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out += line
        in_sft = in_sft or ("[chat_sft]" in line and "====" in line)
        if in_sft and line.startswith("step 1/"):
            # Ctrl-C, as a terminal sends it to the whole process group; the group is paused around
            # it so the 4-step smoke SFT cannot finish before the signal lands
            os.killpg(proc.pid, signal.SIGSTOP)
            os.killpg(proc.pid, signal.SIGINT)
            os.killpg(proc.pid, signal.SIGCONT)
            break
    out += proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out[-3000:]
    assert "stage 'chat_sft' failed (exit 130)" in out and "saved" in out.split("[chat_sft]")[-1]
    assert not (marks / "chat_sft").exists()
    r = speedrun("--smoke-test", env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "[base_train] finished in an earlier run, skipped" in r.stdout
    assert "[mid_train] finished in an earlier run, skipped" in r.stdout
    assert "resumed from" in r.stdout.split("[chat_sft]")[1]  # from the checkpoint the Ctrl-C saved
    assert (marks / "chat_sft").exists()


@pytest.mark.slow
def test_smoke_run_cleans_the_users_data_then_trains_on_it(tmp_path):
    """PRETRAIN_JSON, SFT_JSON and DPO_JSON with bad lines: clean_* stages (banner, marker, report
    section) run before training, and the stages train on the cleaned files."""
    import json
    base = tmp_path / "base"
    shared = os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    base.mkdir()
    for name in ("package_cache", "tiktoken_cache"):
        if os.path.isdir(os.path.join(shared, name)):
            os.symlink(os.path.join(shared, name), base / name)
    words = "river stone lamp garden window orange violet thunder paper castle quiet engine 河流 石头 花园 窗户".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40 + i % 30)) + f" {i}" for i in range(150)]
    (tmp_path / "pretrain.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
                                             + '{"text": broken\n', encoding="utf-8")
    convs = [{"conversations": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(40)]
    convs.insert(3, {"conversations": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]})
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    pairs = [{"chosen": c["conversations"], "rejected": c["conversations"][:1] + [
        {"role": "assistant", "content": f"{i} plus {i} is {2 * i + 1}."}]} for i, c in enumerate(convs) if i != 3]
    (tmp_path / "dpo.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    env = {"NANOCHAT_BASE_DIR": str(base), "PRETRAIN_JSON": str(tmp_path / "pretrain.jsonl"),
           "SFT_JSON": str(tmp_path / "sft.jsonl"), "DPO_JSON": str(tmp_path / "dpo.jsonl")}
    r = speedrun("--smoke-test", env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("clean_pretrain", "clean_sft", "clean_dpo"):
        assert f"[{stage}]" in r.stdout and (base / "smoke" / "speedrun" / "smoke" / "done" / stage).exists()
    assert "removed 1 (malformed_json 1)" in r.stdout and "removed 1 (unknown_role 1)" in r.stdout
    assert "--input=" + str(base / "smoke" / "clean" / "pretrain" / "pretrain.clean.jsonl") in r.stdout
    assert "JSONLConversations 40" in r.stdout
    report = open(os.path.join(REPO, "report.md"), encoding="utf-8").read()
    assert "## Data cleaning: sft.jsonl" in report and "| unknown_role | 1 | 4 |" in report
    stats = json.loads((base / "smoke" / "chatsft_checkpoints" / "d2" / "dataset_stats.json").read_text())
    assert stats["JSONLConversations"]["cleaning"]["removed"] == {"unknown_role": 1}
