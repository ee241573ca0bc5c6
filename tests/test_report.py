"""
The report card: sections replace themselves, the summary table follows the stage order,
plots are copied and referenced, timings and the cost line appear, missing plots are reported.
Run: python -m pytest tests/test_report.py -q
"""
import os

import pytest

from nanochat import report
from nanochat.training import plot_loss_curve


@pytest.fixture()
def rdir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_REPORT_DIR", str(tmp_path / "report"))
    monkeypatch.delenv("RANK", raising=False)
    report.reset()
    return tmp_path / "report"


def test_sections_summary_plots_and_timings(rdir, tmp_path):
    png = tmp_path / "loss.png"
    assert plot_loss_curve(str(png), [1, 2, 3], [3.0, 2.5, 2.0])
    report.log_section("Base training", metrics={"val bpb": 2.1, "steps": 250}, config={"depth": 4, "obj": object()},
                       plots=[str(png)], stage="BASE", summary={"val bpb": 2.1})
    report.log_section("Chat SFT", metrics={"arithmetic": 0.9}, stage="SFT", summary={"arithmetic": 0.9},
                       table="| task | acc |\n|---|---|\n| arithmetic | 0.9 |")
    report.log_section("Base eval", stage="BASE", summary={"CORE": 0.05})
    report.log_section("Base training", metrics={"val bpb": 1.98}, stage="BASE", summary={"val bpb": 1.98},
                       plots=[str(png)], config={"depth": 4, "obj": object()})  # a re-run replaces its section
    report.record_stage("base_train", "done", 600, "logs/base_train.log")
    report.record_stage("chat_sft", "done", 300)

    out = tmp_path / "out" / "report.md"
    out.parent.mkdir()
    path, missing = report.generate(str(out))
    text = out.read_text()
    assert path == str(out) and missing == []
    assert text.count("## Base training") == 1 and "1.9800" in text and "2.1000" not in text
    assert "| stage | CORE | val bpb | arithmetic |" in text  # stage order, then time
    assert text.index("| BASE |") < text.index("| SFT |")
    assert "| BASE | 0.0500 | 1.9800 | - |" in text
    assert "![Base training: base-training-loss.png](report_plots/base-training-loss.png)" in text
    assert (out.parent / "report_plots" / "base-training-loss.png").exists()
    assert (out.parent / "report_plots" / "summary-metrics.png").exists()
    assert "| base_train | done | 10.0 | logs/base_train.log |" in text
    assert "wall time**: 15.0 min" in text and "cost estimate" in text
    assert "`depth=4`" in text and "obj" not in text  # objects are not dumped into the report
    assert "commit" in text and "torch" in text


def test_missing_plot_is_reported(rdir, tmp_path):
    png = tmp_path / "p.png"
    plot_loss_curve(str(png), [1, 2], [1.0, 0.5])
    report.log_section("Stage", plots=[str(png)])
    os.unlink(rdir / "plots" / "stage-p.png")
    _, missing = report.generate(str(tmp_path / "r.md"))
    assert missing == ["report_plots/stage-p.png"]


def test_other_ranks_and_bad_stage(rdir, monkeypatch):
    with pytest.raises(ValueError, match="not one of"):
        report.log_section("x", stage="PRETRAIN")
    monkeypatch.setenv("RANK", "1")
    assert report.log_section("rank one") is None
    assert report.read_sections() == []


def test_reset_forgets_previous_run(rdir):
    report.log_section("old", summary={"a": 1}, stage="MID")
    report.record_stage("old", "done", 1)
    report.reset()
    assert report.read_sections() == [] and report.read_stages() == {}


def test_docs_links_resolve_in_git():
    """Every relative link and image in the READMEs and the example report names a file git tracks
    (the example report and its plots were once ignored and never committed)."""
    import re
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tracked = set(subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True,
                                 check=True).stdout.splitlines())
    if not tracked:
        pytest.skip("not a git checkout")
    docs = ["README.md", "README_zh.md", "docs/example_report/report.md"]
    missing, images = [], 0
    for doc in docs:
        assert doc in tracked, doc
        text = open(os.path.join(repo, doc), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(doc), target))
            images += path.endswith(".png")
            if path not in tracked and not any(t.startswith(path + "/") for t in tracked):
                missing.append(f"{doc}: {target}")
    assert not missing, missing
    assert images >= 8  # the example report's six plots and the README's
