"""The glue of every training loop: TrainingLoop (when to evaluate, one optimizer step, one log
line, save-or-stop, teardown) and its pieces: lr schedule, Muon momentum warm-up, the ETA, clean
stop on SIGINT/SIGTERM, a memory guard, RNG state for resume, the loss-curve PNG and atomic JSON."""
import json
import math
import os
import random
import signal
import threading
import time

import torch
import torch.distributed as dist

from nanochat.common import atomic_open, compute_cleanup, get_peak_flops, init_wandb, is_distributed, print0


# -----------------------------------------------------------------------------
# Schedules

def lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warm-up to 1, constant, then linear warm-down to final_lr_frac at num_iterations."""
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if step <= num_iterations - warmdown_iters:
        return 1.0
    progress = max(0.0, (num_iterations - step) / warmdown_iters)  # 1 -> 0 over the warm-down
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step, warmup_steps=300, start=0.85, end=0.95):
    """Muon's momentum ramps from 0.85 to 0.95 over the first 300 steps (less noisy early updates)."""
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end


# -----------------------------------------------------------------------------
# Progress line and ETA

def format_hms(seconds):
    """h:mm:ss (hours unbounded); "n/a" for None."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_step_line(step, total, loss, lr_mult, tok_per_sec, mfu, elapsed_s, eta=None):
    """One log line per step.

    step: steps completed so far (1..total); mfu: a fraction (0.45 prints 45.00%) or None (n/a);
    eta: an ETA estimator, seconds left, or None for a linear extrapolation of elapsed_s.
    """
    width = len(str(total))
    if isinstance(eta, ETA):
        eta_s = eta.seconds_left(step)
    elif eta is None and step > 0 and elapsed_s > 0:
        eta_s = elapsed_s / step * max(0, total - step)
    else:
        eta_s = eta
    pct = 100.0 * step / total if total else 0.0
    mfu_text = "n/a" if mfu is None else f"{100 * mfu:.2f}%"
    return (f"step {step:0{width}d}/{total} ({pct:5.1f}%) | loss {loss:.6f} | lrm {lr_mult:.3f} | "
            f"tok/s {tok_per_sec:,.0f} | mfu {mfu_text} | elapsed {format_hms(elapsed_s)} | eta {format_hms(eta_s)}")


class ETA:
    """Time left from an EMA of step times, ignoring the first `skip_steps` timed steps of this
    process (torch.compile and allocator warm-up make them slow)."""

    def __init__(self, total_steps, skip_steps=5, beta=0.9):
        self.total_steps, self.skip_steps, self.beta = total_steps, skip_steps, beta
        self.seen = 0
        self.ema = None  # seconds per step; starts at the first counted sample, so no bias correction

    def update(self, step_seconds):
        self.seen += 1
        if self.seen <= self.skip_steps:
            return
        self.ema = step_seconds if self.ema is None else self.beta * self.ema + (1 - self.beta) * step_seconds

    def seconds_left(self, step):
        """Seconds for the steps after `step` (steps completed); None until a step was counted."""
        if self.ema is None:
            return None
        return self.ema * max(0, self.total_steps - step)


# -----------------------------------------------------------------------------
# Clean stop

class GracefulExit:
    """SIGINT/SIGTERM set `.requested` so the loop can save a checkpoint and exit cleanly.

    A second SIGINT raises KeyboardInterrupt at once, unless it comes within `repeat_window_s`
    of the first: that is the same Ctrl-C delivered twice (older torchrun versions share the
    terminal's process group with their workers and also forward the signal). Use as a context
    manager or call close() to restore the previous handlers. Under DDP, combine ranks with
    any_rank(flag, device) so every rank stops at the same step.
    """

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM), repeat_window_s=1.0):
        self.requested = False
        self.signal_name = None
        self.repeat_window_s = repeat_window_s
        self._first_time = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.requested:
            if signum == signal.SIGINT and now - self._first_time > self.repeat_window_s:
                self.close()
                raise KeyboardInterrupt  # second Ctrl-C: stop now, no checkpoint
            return
        self.requested = True
        self._first_time = now
        self.signal_name = signal.Signals(signum).name
        print0(f"\n{self.signal_name} received: saving a checkpoint at the end of this step, then exiting "
               "(Ctrl-C again to stop immediately)", flush=True)

    def reason(self):
        """None, or why the loop should stop (e.g. "SIGTERM received")."""
        return f"{self.signal_name} received" if self.requested else None

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def any_rank(flag, device=None):
    """True if `flag` is true on any rank (so every rank stops at the same step); plain bool without DDP."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# -----------------------------------------------------------------------------
# Pieces of every training loop

def set_schedule(optimizers, lrm, step):
    """lr = initial_lr * lrm for every group; the Muon optimizer (the last) gets its momentum warm-up."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
    for group in optimizers[-1].param_groups:
        group["momentum"] = muon_momentum(step)


def stop_reason(graceful, memory_guard, device=None):
    """Why this rank (or another) wants to stop now, or None; all ranks agree, or the collectives hang."""
    reason = graceful.reason() or memory_guard.check()
    if any_rank(reason, device):
        return reason or "another rank asked to stop"
    return None


def restore_train_state(train_state, optimizers, num_lanes):
    """Load the optimizer states and RNG saved beside a checkpoint; returns the data lanes' positions.
    The lanes (ranks x accumulation) must match, or the data order would silently change."""
    for opt, opt_state in zip(optimizers, train_state["optimizers"]):
        opt.load_state_dict(opt_state)
    if train_state["num_lanes"] != num_lanes:
        raise SystemExit(f"resume: checkpoint was written with {train_state['num_lanes']} data lanes (ranks x accum), "
                         f"this run has {num_lanes}; keep the same batch layout to resume")
    set_rng_state(train_state["rng"])
    return train_state["loader_states"]


def train_state(optimizers, loader_states, num_lanes):
    """What each rank saves beside the model: optimizer state, data position, RNG."""
    return {"optimizers": [opt.state_dict() for opt in optimizers], "loader_states": loader_states,
            "num_lanes": num_lanes, "rng": get_rng_state()}


# -----------------------------------------------------------------------------
# Gradient clipping on the global gradient

def clip_grad_norm(model, optimizers, max_norm):
    """
    Clip to max_norm by the norm of the *rank-averaged* gradient, so a DDP run clips exactly
    as one process with the same total batch does. The distributed optimizers average the
    gradients inside their step; here each first reduces (`reduce_gradients()` returns the
    squared norm of the shard it owns), one all-reduce gives the global norm, and the scale
    is handed to their step. Returns the norm before clipping.
    """
    distributed = [opt for opt in optimizers if hasattr(opt, "reduce_gradients")]
    if not distributed:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    assert len(distributed) == len(optimizers), "mixing distributed and local optimizers"
    sq = sum(opt.reduce_gradients() for opt in optimizers)
    dist.all_reduce(sq)
    norm = sq.sqrt().item()
    scale = min(1.0, max_norm / (norm + 1e-6))
    for opt in optimizers:
        opt.grad_scale = scale
    return norm


# -----------------------------------------------------------------------------
# Memory guard

def _read_proc_kb(path, field):
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


class MemoryGuard:
    """Stop before the machine runs out of RAM (Linux /proc; disabled elsewhere or with frac <= 0).

    check() returns None, or a message when this process's RSS exceeds max_memory_frac of total
    RAM, or when MemAvailable falls below min_available_frac of total RAM.
    """

    def __init__(self, max_memory_frac=0.9, min_available_frac=0.03):
        self.max_memory_frac = max_memory_frac
        self.min_available_frac = min_available_frac
        self.enabled = bool(max_memory_frac) and max_memory_frac > 0 and os.path.exists("/proc/meminfo")
        self.total = _read_proc_kb("/proc/meminfo", "MemTotal") if self.enabled else None

    def rss_bytes(self):
        return _read_proc_kb("/proc/self/status", "VmRSS")

    def available_bytes(self):
        return _read_proc_kb("/proc/meminfo", "MemAvailable")

    def check(self):
        if not self.enabled or not self.total:
            return None
        gib = 1024 ** 3
        rss, avail = self.rss_bytes(), self.available_bytes()
        if rss is not None and rss > self.max_memory_frac * self.total:
            return (f"memory guard: this process uses {rss / gib:.2f} GiB RSS, over max_memory_frac="
                    f"{self.max_memory_frac} of {self.total / gib:.1f} GiB RAM; saving and stopping "
                    "(lower device_batch_size / max_seq_len, or raise --max_memory_frac)")
        if avail is not None and avail < self.min_available_frac * self.total:
            return (f"memory guard: only {avail / gib:.2f} GiB RAM available "
                    f"(< {self.min_available_frac:.0%} of {self.total / gib:.1f} GiB); saving and stopping")
        return None


# -----------------------------------------------------------------------------
# RNG state for exact resume (tensors and ints only, so torch.load(weights_only=True) accepts it)

def get_rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_as_tuples(state["python"]))
    torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _as_tuples(x):
    # random.setstate wants (version, tuple_of_ints, gauss); a save/load round trip may give lists
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# -----------------------------------------------------------------------------
# The loop's glue, in one place

class TrainingLoop:
    """What every training script's loop shares; the script keeps its forward, backward and
    metrics inline and calls, in this order:

        if loop.eval_now(step): ... evaluate ...; loop.log_eval(step, {"val bpb": v})
        if loop.save_or_stop(step, save): break     # the step's clock starts when it returns False
        ... forward + backward ...
        lrm = loop.optimizer_step(model, optimizers, step)
        step += 1
        loop.log(step, loss, lrm, tokens)           # print + history + wandb
        ...
        loop.finish(step)                           # after the loop (and the report section)

    Evaluating: every eval_every steps and at the last step; never when eval_every <= 0; not again
    at the step a resumed run starts from (its checkpoint was saved after that evaluation).
    history: {"step", "loss", metrics..., "val_step", eval metrics...}, saved in the checkpoint's
    meta and handed back on resume. wandb (run != "dummy", rank 0 only) gets the same numbers."""

    def __init__(self, num_iterations, *, start_step=0, history=None, eval_every=0, save_every=-1, grad_clip=0.0,
                 warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0, max_memory_frac=0.9, run="dummy", config=None,
                 use_dummy_wandb=False, device=None, flops_per_token=None, world_size=1):
        self.num_iterations, self.start_step = num_iterations, start_step
        self.history = history or {"step": [], "loss": [], "val_step": []}
        self.eval_every, self.save_every, self.grad_clip = eval_every, save_every, grad_clip
        self.schedule = (warmup_ratio, warmdown_ratio, final_lr_frac)
        master = int(os.environ.get("RANK", 0)) == 0
        self.wandb_run = init_wandb(run, config or {}, master, use_dummy_wandb=use_dummy_wandb)  # run "dummy": nowhere
        self.device, self.world_size, self.flops_per_token = device, world_size, flops_per_token
        self.peak_flops = get_peak_flops(device) if device is not None and flops_per_token else None
        self.graceful, self.memory_guard = GracefulExit(), MemoryGuard(max_memory_frac)
        self.eta = ETA(total_steps=num_iterations)
        self.t_start = self.t_step = time.time()

    def save(self, checkpoint_dir, step, model_state, optimizer_state, meta, *, rank, keep_last, config, curve):
        """A stage's checkpoint: rank 0 writes the model and the meta (with this loop's history), every
        rank its optimizer state; then rank 0 config.json and the curve plot. curve: (file name, title,
        history key of the training curve, history key of the eval curve or None, its label)."""
        from nanochat.checkpoint_manager import save_checkpoint
        save_checkpoint(checkpoint_dir, step, model_state, optimizer_state, {**meta, "history": self.history},
                        rank=rank, keep_last=keep_last)
        if rank == 0:
            write_json_atomic(os.path.join(checkpoint_dir, "config.json"), config)
            name, title, key, val_key, val_label = curve
            plot_loss_curve(os.path.join(checkpoint_dir, name), self.history["step"], self.history.get(key, []), title,
                            val_steps=self.history["val_step"], val_values=self.history.get(val_key) if val_key else None,
                            val_label=val_label)
        print0(f"saved {checkpoint_dir} step {step}")

    def eval_now(self, step):
        if self.eval_every <= 0 or (step == self.start_step and step > 0):
            return False
        return step % self.eval_every == 0 or step == self.num_iterations

    def save_or_stop(self, step, save):
        """Call save(step) at the last step, every save_every steps and when asked to stop (Ctrl-C,
        SIGTERM, the memory guard, on any rank); True when the loop should end."""
        last_step = step == self.num_iterations
        stopping = stop_reason(self.graceful, self.memory_guard, self.device)
        if last_step or stopping or (self.save_every > 0 and step > self.start_step and step % self.save_every == 0):
            save(step)
        if stopping:
            print0(f"stopping at step {step}: {stopping} (resume with --resume)")
        self.t_step = time.time()
        return last_step or bool(stopping)

    def lr_multiplier(self, step):
        return lr_multiplier(step, self.num_iterations, *self.schedule)

    def optimizer_step(self, model, optimizers, step):
        """Clip the global gradient norm, set the lr schedule (and Muon's momentum), step every
        optimizer, zero the gradients. Returns the lr multiplier."""
        if self.grad_clip > 0:  # on the rank-averaged gradient, so DDP and accumulation agree
            clip_grad_norm(model, optimizers, self.grad_clip)
        lrm = self.lr_multiplier(step)
        set_schedule(optimizers, lrm, step)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return lrm

    def log(self, step, loss, lrm, tokens, metrics=None):
        """One line for the step just taken (tokens: processed by all ranks), its history and wandb."""
        dt = time.time() - self.t_step
        self.eta.update(dt)
        tok_per_sec = tokens / dt
        mfu = self.flops_per_token * tok_per_sec / (self.peak_flops * self.world_size) if self.peak_flops else None
        metrics = metrics or {}
        self._record("step", step, {"loss": loss, **metrics})
        print0(format_step_line(step, self.num_iterations, loss, lrm, tok_per_sec, mfu, time.time() - self.t_start, self.eta)
               + "".join(f" | {k} {v:.4f}" for k, v in metrics.items()))
        self.wandb_run.log({"step": step, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec,
                            **{f"train/{k.replace(' ', '_')}": v for k, v in {"loss": loss, **metrics}.items()}})

    def log_eval(self, step, metrics):
        print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        self._record("val_step", step, metrics)
        self.wandb_run.log({"step": step, **{f"val/{k.replace(' ', '_')}": v for k, v in metrics.items()}})

    def _record(self, step_key, step, values):
        self.history.setdefault(step_key, []).append(step)
        for k, v in values.items():
            series = self.history.setdefault(k, [])
            if len(series) >= len(self.history[step_key]):  # one value per step of its kind
                raise ValueError(f"history: {k!r} is logged both per step and per evaluation: give them distinct names")
            series.append(v)

    def last(self, key, default=None):
        """The latest value of a history series (e.g. the last val bpb)."""
        return self.history[key][-1] if self.history.get(key) else default

    def finish(self, step):
        """After the loop: restore the signal handlers, close wandb and the process group, and exit
        130 (Ctrl-C / SIGTERM) or 3 (memory guard) if the run stopped before its last step, so a
        pipeline such as speedrun.sh never takes it for finished."""
        self.graceful.close()
        self.wandb_run.finish()
        compute_cleanup()
        if step < self.num_iterations:
            raise SystemExit(130 if self.graceful.requested else 3)


# -----------------------------------------------------------------------------
# Files beside the checkpoints

def write_json_atomic(path, obj):
    """JSON with indent 2, written to a temp file, fsynced and renamed."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def plot_loss_curve(path, steps, losses, title="train loss", recent=None, val_steps=None, val_values=None,
                    val_label="val bpb"):
    """PNG with two panels: the whole run and the recent window (default: last 20%, >= 50 steps).

    The title carries current / min / mean (mean over the recent window). An optional val series
    is drawn on a second y axis of the whole-run panel. Written atomically. Returns False (and
    writes nothing) when there are no losses yet, e.g. a run stopped before its first step.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    steps, losses = list(steps), [float(x) for x in losses]
    if not losses:
        return False
    n = len(losses)
    recent = recent or max(50, n // 5)
    r_steps, r_losses = steps[-recent:], losses[-recent:]
    finite = [x for x in losses if math.isfinite(x)]
    r_finite = [x for x in r_losses if math.isfinite(x)] or [float("nan")]
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    fig.suptitle(f"{title} | current {losses[-1]:.4f} | min {min(finite, default=float('nan')):.4f} | "
                 f"mean (last {len(r_losses)}) {sum(r_finite) / len(r_finite):.4f}")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if n >= 10:  # smoothed line: an EMA makes the trend visible under the step-to-step noise
        ema, smooth = losses[0], []
        for x in losses:
            ema = 0.9 * ema + 0.1 * x if math.isfinite(x) else ema
            smooth.append(ema)
        ax1.plot(steps, smooth, lw=1.5, label="EMA 0.9")
    if val_steps is not None and val_values is not None and len(val_values):
        ax_val = ax1.twinx()
        ax_val.plot(list(val_steps), [float(v) for v in val_values], "o-", color="tab:red", ms=3, label=val_label)
        ax_val.set_ylabel(val_label)
        ax_val.legend(loc="upper center")
    ax1.legend(loc="upper right")
    ax1.set_title("whole run")
    ax2.plot(r_steps, r_losses, lw=1.0)
    ax2.set_title(f"last {len(r_losses)} steps")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return True
