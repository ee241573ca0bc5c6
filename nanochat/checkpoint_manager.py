"""Checkpoints: atomic save, verified load, find the latest, resolve a user's checkpoint argument.

Layout: <base>/<stage>_checkpoints/<model_tag>/
    model_<step:06d>.pt            model state dict (rank 0)
    optim_<step:06d>_rank<r>.pt    optimizer (+ loader/RNG) state of rank r
    meta_<step:06d>.json           written LAST by rank 0: step, caller's meta, size + sha256 of every file

A checkpoint is complete exactly when its meta exists: every file is written to a temp file,
fsynced and renamed before the meta is, so a crash mid-save leaves at worst an incomplete
checkpoint that find/resolve ignore. Load verifies sizes and checksums before unpickling.
"""
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.common import atomic_open, get_base_dir, is_distributed, print0, sha256_file

STAGES = ("base", "mid", "chatsft", "chatdpo", "chatrl", "distill")
META_RE = re.compile(r"^meta_(\d+)\.json$")
STEP_FILE_RE = re.compile(r"^(?:model|meta|optim)_(\d+)(?:_rank\d+)?\.(?:pt|json)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message names the file."""


def model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")


def stage_dir(stage):
    """<base>/<stage>_checkpoints for a stage name ("base", ...) or a directory name ("base_checkpoints")."""
    name = stage if stage.endswith("_checkpoints") else f"{stage}_checkpoints"
    return os.path.join(get_base_dir(), name)


# -----------------------------------------------------------------------------
# Save

class _HashingWriter:
    """File wrapper that hashes and counts bytes as torch.save writes them (no second read pass)."""

    def __init__(self, f):
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def write(self, b):
        self.sha.update(b)
        self.nbytes += len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def _save_torch(obj, path):
    """torch.save atomically; returns {"bytes": n, "sha256": hex} of what was written."""
    with atomic_open(path, "wb") as f:
        w = _HashingWriter(f)
        torch.save(obj, w)
    return {"bytes": w.nbytes, "sha256": w.sha.hexdigest()}


def _remove_stale_temp_files(checkpoint_dir):
    """Delete temp files left by a killed save. Called by rank 0 before the save's first barrier,
    when no rank of this job is writing; a temp file of a live process on this machine is kept."""
    for path in glob.glob(os.path.join(checkpoint_dir, ".*.tmp*")):
        m = re.search(r"\.tmp(\d+)$", path)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # writer still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(path)
        except OSError:
            pass


def save_checkpoint(checkpoint_dir, step, model_state, optimizer_state, meta, rank=0, keep_last=None):
    """Save one checkpoint atomically. Under DDP every rank calls it (collective).

    Rank 0 writes model_state (may be None on other ranks); each rank writes its
    optimizer_state (None: no optim file). Rank 0 writes the meta last: `meta` plus
    "step" and "files" (bytes + sha256 of each file). keep_last=K then removes older
    checkpoints (complete or not) beyond the newest K complete ones.
    Returns the meta dict written (rank 0) or None.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    distributed = is_distributed()
    if rank == 0:
        _remove_stale_temp_files(checkpoint_dir)
        # overwriting a step (resume from an earlier one): drop its meta first so the step stays
        # incomplete, never "complete with mismatching files", until the new meta lands
        if os.path.exists(meta_path(checkpoint_dir, step)):
            os.unlink(meta_path(checkpoint_dir, step))
    if distributed:
        dist.barrier()
    files = {}
    if rank == 0:
        if model_state is None:
            raise ValueError("rank 0 must pass model_state")
        files[os.path.basename(model_path(checkpoint_dir, step))] = _save_torch(model_state, model_path(checkpoint_dir, step))
    if optimizer_state is not None:
        path = optim_path(checkpoint_dir, step, rank)
        files[os.path.basename(path)] = _save_torch(optimizer_state, path)
    if distributed:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, files)  # also a barrier: every rank's files are on disk
        for g in gathered:
            files.update(g)
    if rank != 0:
        if distributed:
            dist.barrier()  # wait for rank 0's meta so no rank runs ahead of an incomplete checkpoint
        return None
    full_meta = {k: v for k, v in (meta or {}).items() if k != "checkpoint_file"}
    full_meta["step"] = step
    full_meta["files"] = dict(sorted(files.items()))
    with atomic_open(meta_path(checkpoint_dir, step), "w") as f:
        json.dump(full_meta, f, indent=2, default=str)
    if keep_last is not None:
        prune_checkpoints(checkpoint_dir, keep_last)
    if distributed:
        dist.barrier()
    return full_meta


def prune_checkpoints(checkpoint_dir, keep_last):
    """Keep the newest `keep_last` complete checkpoints; delete every older step's files."""
    if keep_last is None or keep_last < 1:
        return
    steps = list_steps(checkpoint_dir)
    if len(steps) <= keep_last:
        return
    cutoff = steps[-keep_last]  # oldest step kept
    for name in os.listdir(checkpoint_dir):
        m = STEP_FILE_RE.match(name)
        if m and int(m.group(1)) < cutoff and name.startswith("meta_"):
            os.unlink(os.path.join(checkpoint_dir, name))  # metas first: the step turns incomplete at once
    for name in os.listdir(checkpoint_dir):
        m = STEP_FILE_RE.match(name)
        if m and int(m.group(1)) < cutoff:
            os.unlink(os.path.join(checkpoint_dir, name))


# -----------------------------------------------------------------------------
# Load

def read_meta(checkpoint_dir, step):
    """The meta dict of a checkpoint; CheckpointError when missing or unreadable."""
    path = meta_path(checkpoint_dir, step)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing meta file: checkpoint step {step} is incomplete or does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable meta file: {e}") from None
    if not isinstance(meta, dict) or "files" not in meta:
        raise CheckpointError(f"{path}: meta file has no 'files' record (not written by save_checkpoint)")
    return meta


def _verify_file(path, meta, meta_file):
    record = meta["files"].get(os.path.basename(path))
    if record is None:
        raise CheckpointError(f"{path}: not recorded in {meta_file} (it lists: {', '.join(meta['files'])})")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing file (recorded in {os.path.basename(meta_file)}, {record['bytes']} bytes)")
    size = os.path.getsize(path)
    if size != record["bytes"]:
        raise CheckpointError(f"{path}: truncated or wrong size: {size} bytes on disk, {record['bytes']} expected")
    digest = sha256_file(path)
    if digest != record["sha256"]:
        raise CheckpointError(f"{path}: corrupt: sha256 {digest[:16]}... does not match the meta's {record['sha256'][:16]}...")


def _load_verified(path, meta, meta_file, device):
    _verify_file(path, meta, meta_file)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be loaded: {type(e).__name__}: {e}") from None


def verify_checkpoint(checkpoint_dir, step):
    """Check every file the meta records (size + sha256) without unpickling; returns the meta."""
    meta = read_meta(checkpoint_dir, step)
    for name in meta["files"]:
        _verify_file(os.path.join(checkpoint_dir, name), meta, meta_path(checkpoint_dir, step))
    return meta


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """Return (model_state, optimizer_state or None, meta), verifying size and sha256 first.

    meta gets "checkpoint_file" (the model file's path) for error messages; save drops it.
    """
    meta = read_meta(checkpoint_dir, step)
    meta_file = meta_path(checkpoint_dir, step)
    model_state = _load_verified(model_path(checkpoint_dir, step), meta, meta_file, device)
    optimizer_state = None
    if load_optimizer:
        optimizer_state = _load_verified(optim_path(checkpoint_dir, step, rank), meta, meta_file, device)
    meta["checkpoint_file"] = model_path(checkpoint_dir, step)
    return model_state, optimizer_state, meta


# -----------------------------------------------------------------------------
# Find

def list_steps(checkpoint_dir):
    """Sorted steps of the complete checkpoints (meta and model file present) in a model-tag dir."""
    if not os.path.isdir(checkpoint_dir):
        return []
    steps = []
    for name in os.listdir(checkpoint_dir):
        m = META_RE.match(name)
        if m and os.path.exists(model_path(checkpoint_dir, int(m.group(1)))):
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir):
    """Newest complete step in a model-tag dir, or None when there is none (or no such dir)."""
    steps = list_steps(checkpoint_dir)
    return steps[-1] if steps else None


def find_latest_model_tag(stage_dir_path):
    """The model tag in a stage dir whose newest complete checkpoint was written last (meta mtime)."""
    best, best_mtime = None, None
    if os.path.isdir(stage_dir_path):
        for tag in sorted(os.listdir(stage_dir_path)):
            steps = list_steps(os.path.join(stage_dir_path, tag))
            if steps:
                mtime = os.path.getmtime(meta_path(os.path.join(stage_dir_path, tag), steps[-1]))
                if best_mtime is None or mtime > best_mtime:
                    best, best_mtime = tag, mtime
    if best is None:
        raise CheckpointError(f"{stage_dir_path}: no model tag with a complete checkpoint\n{describe_checkpoints()}")
    return best


def describe_checkpoints(base_dir=None):
    """A listing of every stage/tag with its complete steps, for error messages."""
    base_dir = base_dir or get_base_dir()
    lines = []
    for sdir in sorted(glob.glob(os.path.join(base_dir, "*_checkpoints"))):
        for tag in sorted(os.listdir(sdir)):
            steps = list_steps(os.path.join(sdir, tag))
            if steps:
                shown = ", ".join(str(s) for s in steps[-5:])
                lines.append(f"  {os.path.basename(sdir)}/{tag}: steps {'..., ' if len(steps) > 5 else ''}{shown}")
    if not lines:
        return f"No complete checkpoints under {base_dir}."
    return f"Available checkpoints under {base_dir}:\n" + "\n".join(lines)


def _latest_in(directory):
    """A dir is either a model-tag dir (holds checkpoints) or a stage dir (holds tag dirs)."""
    steps = list_steps(directory)
    if steps:
        return directory, steps[-1]
    tag_dir = os.path.join(directory, find_latest_model_tag(directory))
    return tag_dir, list_steps(tag_dir)[-1]


def resolve_checkpoint(arg, default_stage=None):
    """Turn a user's checkpoint argument into (checkpoint_dir, step).

    Accepted (absolute, or relative to the base dir):
      latest | latest.pt                       newest tag of `default_stage`, newest step
      base_checkpoints | base_checkpoints/latest[.pt]   newest tag of that stage, newest step
      base_checkpoints/d4 | .../d4/latest[.pt]          newest step of that tag
      base_checkpoints/d4/model_000200.pt (or meta_000200.json)   that step
    A bare tag ("d4", "d4/model_000200.pt") is also looked up in `default_stage`'s dir.
    """
    if not arg:
        raise CheckpointError("empty checkpoint argument")
    base = get_base_dir()
    candidates = [arg if os.path.isabs(arg) else os.path.join(base, arg)]
    if default_stage and not os.path.isabs(arg):
        candidates.append(os.path.join(stage_dir(default_stage), arg))
    errors = []
    for path in candidates:
        path = os.path.normpath(path)
        name = os.path.basename(path)
        try:
            if name in ("latest", "latest.pt"):
                parent = os.path.dirname(path)
                if os.path.normpath(parent) == os.path.normpath(base):
                    if not default_stage:
                        raise CheckpointError(f"{arg!r} needs a stage: use e.g. base_checkpoints/latest")
                    parent = stage_dir(default_stage)
                if os.path.isdir(parent):
                    return _latest_in(parent)
                continue
            m = STEP_FILE_RE.match(name)
            if m:
                directory, step = os.path.dirname(path), int(m.group(1))
                if step in list_steps(directory):
                    return directory, step
                if os.path.isdir(directory):
                    raise CheckpointError(f"{path}: step {step} is not a complete checkpoint (missing file or meta)")
                continue
            if os.path.isdir(path):
                return _latest_in(path)
        except CheckpointError as e:
            errors.append(str(e).split("\n")[0])
    detail = ("\n" + "\n".join(dict.fromkeys(errors))) if errors else ""
    raise CheckpointError(f"no checkpoint matches {arg!r} (looked in {', '.join(dict.fromkeys(candidates))}){detail}\n{describe_checkpoints()}")


CHAT_STAGES = ("chatrl", "chatdpo", "chatsft", "mid")  # newest-first preference of the chat front ends


def resolve_chat_checkpoint(arg=""):
    """(dir, step) of the user's checkpoint, or else of the newest checkpoint of the most trained
    chat stage (RL, then DPO, SFT, mid): what chat_cli and chat_web talk to by default."""
    if arg:
        return resolve_checkpoint(arg)
    for stage in CHAT_STAGES:
        try:
            return resolve_checkpoint(f"{stage}_checkpoints/latest")
        except CheckpointError:
            continue
    raise CheckpointError(f"no chat model yet: run scripts.mid_train (and scripts.chat_sft) first\n{describe_checkpoints()}")


# -----------------------------------------------------------------------------
# Compatibility and model construction

def check_compatible(meta, tokenizer=None, expected_model_config=None):
    """Raise CheckpointError naming the checkpoint file and the field that does not match: with a
    tokenizer, the model's vocab size and (where the checkpoint recorded it) the tokenizer's
    fingerprint; with expected_model_config, each of its fields. Every consumer of a checkpoint
    checks through here."""
    where = meta.get("checkpoint_file") or f"checkpoint step {meta.get('step')}"
    expected_tokenizer_hash = None
    if tokenizer is not None:
        from nanochat.tokenizer import tokenizer_fingerprint
        expected_model_config = {**(expected_model_config or {}), "vocab_size": tokenizer.get_vocab_size()}
        expected_tokenizer_hash = tokenizer_fingerprint(tokenizer) if meta.get("tokenizer_hash") else None
    if expected_model_config:
        have = meta.get("model_config")
        if have is None:
            raise CheckpointError(f"{where}: meta has no model_config")
        for key, want in dict(expected_model_config).items():
            if key not in have:
                raise CheckpointError(f"{where}: model_config has no {key!r} (expected {want!r})")
            got = have[key]
            if isinstance(got, list) and isinstance(want, tuple):
                want = list(want)
            if got != want:
                what = "vocab size" if key == "vocab_size" else f"model_config[{key!r}]"
                raise CheckpointError(f"{where}: {what} mismatch: checkpoint has {got!r}, expected {want!r}")
    if expected_tokenizer_hash is not None:
        got = meta.get("tokenizer_hash")
        if got is None:
            raise CheckpointError(f"{where}: meta records no tokenizer_hash; cannot confirm it matches the tokenizer")
        if got != expected_tokenizer_hash:
            raise CheckpointError(f"{where}: tokenizer mismatch: checkpoint was trained with tokenizer {got}, "
                                  f"the current tokenizer is {expected_tokenizer_hash}")


def build_model(checkpoint_dir, step, device, phase="eval"):
    """Construct nanochat.gpt.GPT from meta["model_config"] and load the weights. Returns (model, meta)."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    from nanochat.gpt import GPT, GPTConfig  # lazy: checkpoint handling works without the model code
    device = torch.device(device)
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device)
    # torch.compile wraps modules as _orig_mod; the checkpoint may come from a compiled model
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
    if device.type in ("cpu", "mps"):
        # bf16 weights saved on GPU: compute in fp32 where bf16 is slow or unsupported
        model_state = {k: v.float() if v.is_floating_point() else v for k, v in model_state.items()}
    try:
        config = GPTConfig(**meta["model_config"])
    except (KeyError, TypeError, AssertionError) as e:
        raise CheckpointError(f"{meta['checkpoint_file']}: bad model_config in the meta: {e}") from None
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    if hasattr(model, "init_weights"):
        model.init_weights()  # buffers that are not in the state dict (e.g. rotary tables)
    try:
        model.load_state_dict(model_state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{meta['checkpoint_file']}: weights do not fit the model_config: {e}") from None
    model.train(phase == "train")
    return model, meta


# -----------------------------------------------------------------------------
# `python -m nanochat.checkpoint_manager check ARG --stage=base`: is this checkpoint usable?

def load_model(arg, device, tokenizer, default_stage=None, phase="eval"):
    """A user's checkpoint argument -> (model, meta, checkpoint_dir, step): resolved (default_stage
    "chat": the newest chat model when arg is empty, see resolve_chat_checkpoint), every file's
    checksum verified, the model built and checked against the tokenizer (check_compatible)."""
    if default_stage == "chat":
        checkpoint_dir, step = resolve_chat_checkpoint(arg)
    else:
        checkpoint_dir, step = resolve_checkpoint(arg, default_stage=default_stage)
    model, meta = build_model(checkpoint_dir, step, device, phase)
    check_compatible(meta, tokenizer)
    return model, meta, checkpoint_dir, step


@dataclass
class TrainingSource:
    """What a post-training stage starts from (see open_training_source)."""
    model: torch.nn.Module   # to train: the source's weights, the resumed run's, or (LoRA) the frozen source + adapters
    meta: dict               # the meta of the checkpoint the weights came from (LoRA: the source, the adapters' base)
    source_dir: str
    source_step: int
    checkpoint_dir: str      # where this stage writes: <stage>_checkpoints/<model_tag or the source's tag>
    resume_step: int | None  # this stage's newest checkpoint when resuming, else None
    description: str         # what was loaded, for the log

    @property
    def source(self):
        return f"{self.source_dir} step {self.source_step}"


def open_training_source(source, source_stage, stage, device, tokenizer, *, model_tag="", resume=False, lora_rank=0,
                         lora_alpha=32.0, lora_targets=None):
    """The model a post-training stage (mid, SFT, DPO, RL) trains. Resolves the source checkpoint
    argument; when resuming, finds this stage's newest checkpoint; builds the model (LoRA: always
    the source, frozen, with fresh adapters or the ones saved beside the resume checkpoint) and
    checks it against the tokenizer. Any problem exits with a message naming the stage."""
    from nanochat import lora
    try:
        source_dir, source_step = resolve_checkpoint(source, default_stage=source_stage)
        checkpoint_dir = os.path.join(stage_dir(stage), model_tag or os.path.basename(source_dir))
        resume_step = find_last_step(checkpoint_dir) if resume else None
        if resume and resume_step is None:
            print0(f"resume: no checkpoint in {checkpoint_dir}, starting from {source_dir} step {source_step}")
        if resume_step is not None and bool(read_meta(checkpoint_dir, resume_step).get("lora")) != (lora_rank > 0):
            raise CheckpointError(f"resume: {meta_path(checkpoint_dir, resume_step)} was trained "
                                  f"{'without' if lora_rank > 0 else 'with'} LoRA; resume with the same --lora_rank")
        if lora_rank > 0:
            model, meta = build_model(source_dir, source_step, device, phase="train")
            names = lora.apply_lora(model, lora_rank, lora_alpha, lora_targets or lora.DEFAULT_TARGETS)
            description = f"{source_dir} step {source_step} + LoRA rank {lora_rank} alpha {lora_alpha} on {len(names)} layers"
            if resume_step is not None:
                path = lora.adapter_path(checkpoint_dir, resume_step)
                lora.load_adapter(model, path, base_meta=meta)
                description += f" (adapter {path})"
        else:
            load_dir, load_step = (checkpoint_dir, resume_step) if resume_step is not None else (source_dir, source_step)
            model, meta = build_model(load_dir, load_step, device, phase="train")
            description = f"{load_dir} step {load_step}"
        check_compatible(meta, tokenizer)
    except (CheckpointError, lora.LoRAError) as e:
        raise SystemExit(f"{stage}: {e}") from None
    return TrainingSource(model, meta, source_dir, source_step, checkpoint_dir, resume_step, description)


def check_usable(arg, stage, tokenizer):
    """Resolve arg, verify every file's checksum, build the model on CPU and check it against the
    tokenizer. Returns the path of the model file; raises CheckpointError saying what is wrong."""
    _, _, checkpoint_dir, step = load_model(arg, "cpu", tokenizer, default_stage=stage)
    return model_path(checkpoint_dir, step)


def main(argv=None):
    import argparse
    import sys
    parser = argparse.ArgumentParser(description="Check that a checkpoint loads and matches the tokenizer; "
                                                 "prints its model file (exit 0) or why not (exit 1).")
    parser.add_argument("command", choices=["check", "list"])
    parser.add_argument("checkpoint", nargs="?", default="latest")
    parser.add_argument("--stage", default="base", choices=STAGES)
    args = parser.parse_args(argv)
    if args.command == "list":
        print(describe_checkpoints())
        return 0
    from nanochat.tokenizer import get_tokenizer
    try:
        print(check_usable(args.checkpoint, args.stage, get_tokenizer()))
    except (CheckpointError, OSError, ValueError) as e:
        print(f"checkpoint {args.checkpoint!r} is not usable: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
