"""
The report card. Each stage (tokenizer, base training, evals, mid, SFT, DPO, RL, ...) logs one
section: its config, metrics, an optional markdown table and plots. Sections are JSON files
under <base>/report/sections/, so a stage that re-runs replaces its own section and a killed
run keeps what finished. generate() assembles report.md: a header (hardware, git commit,
dependency versions, wall time, cost estimate), the summary table (one row per stage:
BASE / MID / SFT / DPO / RL / DISTILL), the per-stage timing table speedrun.sh records,
a bar chart of the summary metrics, then every section with its plots.

    python -m nanochat.report reset                    # start a new run's report
    python -m nanochat.report generate --out=report.md # plots go beside it, in report_plots/

$NANOCHAT_REPORT_DIR overrides the directory (the tests point it at a temp dir).
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import time

from nanochat.common import atomic_open, get_base_dir

STAGE_ORDER = ["BASE", "MID", "SFT", "DPO", "RL", "DISTILL"]
# Rough rental prices ($/hour) for the cost line; override with $NANOCHAT_HOURLY_COST.
GPU_HOURLY = {"H100": 2.5, "H200": 3.5, "A100": 1.5, "A10": 0.75, "L4": 0.7, "4090": 0.5, "3090": 0.3}
CPU_HOURLY_PER_CORE = 0.02


def report_dir():
    path = os.environ.get("NANOCHAT_REPORT_DIR") or os.path.join(get_base_dir(), "report")
    os.makedirs(os.path.join(path, "sections"), exist_ok=True)
    return path


def slugify(title):
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


def _simple(value):
    """Config values that read well in markdown; tensors, objects and long lists are dropped."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    return isinstance(value, (list, tuple)) and len(value) <= 16 and all(isinstance(v, (bool, int, float, str)) for v in value)


def _write_json(path, obj):
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)


def log_section(title, metrics=None, config=None, table=None, plots=None, stage=None, summary=None, text=None):
    """Write (or replace) the section `title`. Only rank 0 writes; returns the JSON path or None.

    metrics: flat {name: number | str}; config: the script's options; table: markdown text;
    plots: PNG paths (copied, so later runs cannot change them); stage: one of STAGE_ORDER and
    summary: that stage's headline numbers for the summary table ({"val bpb": 1.98}).
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    if stage is not None and stage not in STAGE_ORDER:
        raise ValueError(f"report stage {stage!r} is not one of {STAGE_ORDER}")
    directory = report_dir()
    slug = slugify(title)
    copied = []
    for plot in plots or []:
        if not plot or not os.path.exists(plot):
            continue
        name = f"{slug}-{os.path.basename(plot)}"
        os.makedirs(os.path.join(directory, "plots"), exist_ok=True)
        with open(plot, "rb") as src, atomic_open(os.path.join(directory, "plots", name)) as dst:
            shutil.copyfileobj(src, dst)
        copied.append(name)
    section = {"title": title, "time": datetime.datetime.now().isoformat(timespec="seconds"), "timestamp": time.time(),
               "stage": stage, "summary": dict(summary or {}), "metrics": dict(metrics or {}),
               "config": {k: v for k, v in (config or {}).items() if _simple(v)}, "table": table, "text": text,
               "plots": copied}
    path = os.path.join(directory, "sections", f"{slug}.json")
    _write_json(path, section)
    return path


def record_stage(name, status, seconds, log_path=""):
    """One line of speedrun.sh's timing table (the last record of a stage wins)."""
    directory = report_dir()
    stages = read_stages(directory)
    stages[name] = {"status": status, "seconds": float(seconds), "log": log_path, "order": stages.get(name, {}).get(
        "order", len(stages))}
    _write_json(os.path.join(directory, "stages.json"), stages)


def read_stages(directory=None):
    path = os.path.join(directory or report_dir(), "stages.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def reset():
    """Forget the previous run's sections, plots and timings; remember when this run started."""
    directory = report_dir()
    for sub in ("sections", "plots"):
        shutil.rmtree(os.path.join(directory, sub), ignore_errors=True)
    for name in ("stages.json", "run.json"):
        if os.path.exists(os.path.join(directory, name)):
            os.unlink(os.path.join(directory, name))
    os.makedirs(os.path.join(directory, "sections"), exist_ok=True)
    _write_json(os.path.join(directory, "run.json"), {"start": time.time()})


def read_sections(directory=None):
    """Sections in the order they were logged."""
    sections_dir = os.path.join(directory or report_dir(), "sections")
    sections = []
    for name in sorted(os.listdir(sections_dir)) if os.path.isdir(sections_dir) else []:
        if name.endswith(".json") and not name.startswith("."):
            with open(os.path.join(sections_dir, name), encoding="utf-8") as f:
                sections.append(json.load(f))
    return sorted(sections, key=lambda s: s.get("timestamp", 0))


# -----------------------------------------------------------------------------
# Header facts

def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_info():
    commit = _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
    return {"commit": commit + (" (uncommitted changes)" if dirty else ""), "branch": _run(["git", "branch", "--show-current"])}


def hardware_info():
    info = {"host": socket.gethostname(), "platform": platform.platform(), "cpu cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        info["cpu"] = model or platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        info["ram GiB"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["gpus"] = f"{len(names)} x {names[0]}"
    except Exception:  # a broken CUDA install must not stop the report
        pass
    return info


def dependency_versions():
    from importlib import metadata
    versions = {"python": platform.python_version()}
    for package in ("torch", "numpy", "tiktoken", "pyarrow", "nanochat", "fastapi", "matplotlib"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def hourly_cost(hardware):
    """($/hour, how it was estimated) for this machine."""
    if os.environ.get("NANOCHAT_HOURLY_COST"):
        return float(os.environ["NANOCHAT_HOURLY_COST"]), "$NANOCHAT_HOURLY_COST"
    gpus = hardware.get("gpus")
    if gpus:
        count, name = gpus.split(" x ", 1)
        rate = next((r for key, r in GPU_HOURLY.items() if key in name), 2.0)
        return int(count) * rate, f"{count} GPU x ${rate}/h ({name})"
    cores = hardware.get("cpu cores") or 1
    return cores * CPU_HOURLY_PER_CORE, f"{cores} vCPU x ${CPU_HOURLY_PER_CORE}/h"


# -----------------------------------------------------------------------------
# Markdown

def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_rows(sections):
    """(columns, rows): one row per stage in STAGE_ORDER, the union of the summary keys as columns."""
    by_stage, columns = {}, []
    staged = [s for s in sections if s.get("stage")]
    for s in sorted(staged, key=lambda s: STAGE_ORDER.index(s["stage"])):  # stable: columns in stage order
        by_stage.setdefault(s["stage"], {}).update(s.get("summary") or {})
        columns += [k for k in s.get("summary") or {} if k not in columns]
    rows = [[stage] + [by_stage[stage].get(c, "-") for c in columns] for stage in STAGE_ORDER if stage in by_stage]
    return columns, rows


def plot_summary(path, columns, rows):
    """One bar chart per summary metric across the stages; False when there is nothing numeric."""
    numeric = [c for i, c in enumerate(columns) if any(isinstance(r[i + 1], (int, float)) for r in rows)]
    if not numeric:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    ncols = min(4, len(numeric))
    nrows = -(-len(numeric) // ncols)
    fig = Figure(figsize=(3.4 * ncols, 2.8 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(numeric):]:
        ax.set_visible(False)
    for ax, column in zip(axes, numeric):
        i = columns.index(column) + 1
        points = [(r[0], r[i]) for r in rows if isinstance(r[i], (int, float))]
        ax.bar([p[0] for p in points], [p[1] for p in points], color="#4a78b5")
        ax.set_title(column)
        for x, (_, y) in enumerate(points):
            ax.annotate(f"{y:.3g}", (x, y), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png")
    return True


def render(directory, plots_prefix):
    """The markdown text of the report; plots referenced as <plots_prefix>/<name>."""
    sections = read_sections(directory)
    stages = read_stages(directory)
    hardware = hardware_info()
    lines = ["# nanochat report card", "", f"Generated {datetime.datetime.now().isoformat(timespec='seconds')}.", ""]
    lines += [f"- **{k}**: {v}" for k, v in {**hardware, **git_info()}.items()]
    lines.append("- **versions**: " + ", ".join(f"{k} {v}" for k, v in dependency_versions().items()))
    run_path = os.path.join(directory, "run.json")
    total = sum(s["seconds"] for s in stages.values())  # speedrun's stages; else since `reset`
    if not stages and os.path.exists(run_path):
        with open(run_path) as f:
            total = time.time() - json.load(f)["start"]
    if total:
        rate, how = hourly_cost(hardware)
        lines.append(f"- **wall time**: {total / 60:.1f} min; **cost estimate**: ${rate * total / 3600:.2f} ({how})")
    columns, rows = summary_rows(sections)
    if rows:
        lines += ["", "## Summary", "", markdown_table(["stage"] + columns, rows)]
        if plot_summary(os.path.join(directory, "plots", "summary-metrics.png"), columns, rows):
            lines += ["", f"![summary metrics]({plots_prefix}/summary-metrics.png)"]
    if stages:
        ordered = sorted(stages.items(), key=lambda kv: kv[1].get("order", 0))
        lines += ["", "## Stages", "", markdown_table(["stage", "status", "minutes", "log"],
                                                     [[n, s["status"], f"{s['seconds'] / 60:.1f}", s.get("log", "")]
                                                      for n, s in ordered])]
    for s in sections:
        lines += ["", f"## {s['title']}", "", f"_{s['time']}_"]
        if s.get("text"):
            lines += ["", s["text"]]
        if s.get("metrics"):
            lines += ["", markdown_table(["metric", "value"], list(s["metrics"].items()))]
        if s.get("table"):
            lines += ["", s["table"]]
        lines += [f"\n![{s['title']}: {name}]({plots_prefix}/{name})" for name in s.get("plots", [])]
        if s.get("config"):
            config = ", ".join(f"`{k}={v}`" for k, v in s["config"].items())
            lines += ["", f"<details><summary>config</summary>\n\n{config}\n</details>"]
    return "\n".join(lines) + "\n"


def generate(out_path=None):
    """Write report.md (default <report dir>/report.md); plots are copied to report_plots/ beside it
    unless it lives in the report dir itself. Returns (path, missing plots)."""
    directory = report_dir()
    out_path = os.path.abspath(out_path or os.path.join(directory, "report.md"))
    out_dir = os.path.dirname(out_path)
    plots_src = os.path.join(directory, "plots")
    os.makedirs(plots_src, exist_ok=True)
    same_dir = os.path.samefile(out_dir, directory) if os.path.exists(out_dir) else False
    prefix = "plots" if same_dir else "report_plots"
    text = render(directory, prefix)
    if not same_dir:
        target = os.path.join(out_dir, prefix)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(plots_src, target)
    with atomic_open(out_path, "w") as f:
        f.write(text)
    referenced = re.findall(r"\]\(([^)]+\.png)\)", text)
    missing = [p for p in referenced if not os.path.exists(os.path.join(out_dir, p))]
    return out_path, missing


def main(argv=None):
    parser = argparse.ArgumentParser(description="nanochat report card: reset, or generate report.md")
    parser.add_argument("command", choices=["reset", "generate", "stage"])
    parser.add_argument("--out", default="report.md", help="where generate writes report.md")
    parser.add_argument("--name", help="stage: its name")
    parser.add_argument("--status", default="done", help="stage: done | failed | interrupted")
    parser.add_argument("--seconds", type=float, default=0.0, help="stage: its wall time")
    parser.add_argument("--log", default="", help="stage: its log file")
    args = parser.parse_args(argv)
    if args.command == "reset":
        reset()
        print(f"report: reset {report_dir()}")
    elif args.command == "stage":
        if not args.name:
            parser.error("stage needs --name")
        record_stage(args.name, args.status, args.seconds, args.log)
    else:
        path, missing = generate(args.out)
        print(f"report: wrote {path}")
        if missing:
            print("report: missing plots: " + ", ".join(missing))
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
