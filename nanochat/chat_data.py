"""
Conversations -> training batches, and the fine-tuning loop that mid_train and chat_sft share.

Batches. Each conversation is rendered with tokenizer.render_conversation (ids + loss mask,
<|bos|> first) and cut to T+1 tokens. Rows of T+1 tokens are filled with whole conversations
in order (pack=True: as many as fit; pack=False: one per row) and padded; inputs are row[:-1],
targets row[1:] where the mask of that target token is 1, else -1. So the loss is on assistant
tokens only: never on user text, tool output, padding or the next conversation's <|bos|>.

Lanes. Lane i of L takes conversations i, i+L, i+2L, ... of the task (a TaskMixture is already
shuffled). A run with W ranks and A accumulation steps uses L = W*A lanes, rank r feeding
micro-step k from lane r*A + k, as nanochat/dataloader.py does: DDP == accumulation.

Resume. Rows are filled in order, so a batch ends where a conversation did not fit; the state
{"epoch", "index"} names that conversation (the first one not in any yielded row). Passing it
back in resumes exactly.

Loss normalisation. A step's loss is the sum over every assistant token of all micro-batches
and ranks divided by their count (conversations differ in length, so a mean of per-batch means
would weight short answers more and would differ between DDP and accumulation).
"""
import os
import time
from contextlib import nullcontext

import torch

from nanochat import lora, report
from nanochat.checkpoint_manager import (CheckpointError, find_last_step, list_steps, load_checkpoint, resolve_checkpoint,
                                         save_checkpoint, stage_dir)
from nanochat.common import (all_reduce_sum, autodetect_device_type, compute_cleanup, compute_dtype, compute_init, get_peak_flops,
                             init_wandb, print0, seed_everything)
from nanochat.data_stats import format_stats, task_stats, write_stats
from nanochat.tokenizer import tokenizer_fingerprint
from nanochat.training import (ETA, GracefulExit, MemoryGuard, clip_grad_norm, exit_if_stopped, format_step_line,
                               lr_multiplier,
                               plot_loss_curve, restore_train_state, save_or_stop, set_schedule, train_state,
                               write_json_atomic)


# -----------------------------------------------------------------------------
# Batches

def render_example(tokenizer, conversation, T):
    """(ids, mask) of one conversation, at most T+1 tokens (a row holds T inputs + 1 target)."""
    return tokenizer.render_conversation(conversation, max_tokens=T + 1)


def rows_to_batch(rows, T, pad_id, device):
    """rows: list of (ids, mask) of at most T+1 tokens -> inputs, targets of shape (len(rows), T)."""
    ids = torch.full((len(rows), T + 1), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T + 1), dtype=torch.bool)
    for r, (row_ids, row_mask) in enumerate(rows):
        ids[r, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        mask[r, :len(row_mask)] = torch.tensor(row_mask, dtype=torch.bool)
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -1)
    return ids[:, :-1].to(device), targets.to(device)


def _lane(task, lane, num_lanes, epoch, index):
    """(epoch, index, conversation) for this lane, from `index` on, epoch after epoch."""
    if len(task) <= lane:
        raise ValueError(f"the task has {len(task)} conversations, too few for data lane {lane} of {num_lanes} "
                         f"(ranks x accumulation steps): add data or lower target_examples_per_step")
    while True:
        for i in range(index, len(task), num_lanes):
            yield epoch, i, task.get(i)
        epoch, index = epoch + 1, lane


def conversation_batches(task, tokenizer, B, T, device="cpu", lane=0, num_lanes=1, state=None, pack=True):
    """Infinite generator of (inputs, targets, state), inputs/targets of shape (B, T); see the module doc."""
    state = state or {"epoch": 0, "index": lane}
    bos = tokenizer.get_bos_token_id()
    rows, row_ids, row_mask = [], [], []
    for epoch, i, conversation in _lane(task, lane, num_lanes, state["epoch"], state["index"]):
        ids, mask = render_example(tokenizer, conversation, T)
        if not any(mask[1:]):
            continue  # nothing to learn once truncated (e.g. a very long user turn)
        if row_ids and (not pack or len(row_ids) + len(ids) > T + 1):
            rows.append((row_ids, row_mask))
            row_ids, row_mask = [], []
            if len(rows) == B:
                inputs, targets = rows_to_batch(rows, T, bos, device)
                rows = []
                yield inputs, targets, {"epoch": epoch, "index": i}  # conversation i is not in a yielded row
        row_ids, row_mask = row_ids + ids, row_mask + mask


def conversation_eval_batches(task, tokenizer, B, T, device="cpu", lane=0, num_lanes=1, max_examples=None):
    """One pass (no packing) over this lane's share of the first max_examples conversations:
    (inputs, targets) batches of up to B rows, the last one possibly smaller."""
    n = len(task) if max_examples is None else min(len(task), max_examples)
    bos = tokenizer.get_bos_token_id()
    rows = []
    for i in range(lane, n, num_lanes):
        rows.append(render_example(tokenizer, task.get(i), T))
        if len(rows) == B or i + num_lanes >= n:
            yield rows_to_batch(rows, T, bos, device)
            rows = []


def estimate_rows_per_epoch(task, tokenizer, T, pack=True, sample=256):
    """Rows one pass over the task fills: exact for pack=False, from a sample's mean length otherwise."""
    if not pack or len(task) == 0:
        return len(task)
    step = max(1, len(task) // sample)
    lengths = [len(render_example(tokenizer, task.get(i), T)[0]) for i in range(0, len(task), step)]
    per_row = max(1.0, (T + 1) / (sum(lengths) / len(lengths)) - 0.5)  # ~half a conversation of padding per row
    return max(1, round(len(task) / per_row))


# -----------------------------------------------------------------------------
# Loss over assistant tokens

@torch.no_grad()
def evaluate_loss(model, batches, device, autocast=nullcontext()):
    """Mean cross-entropy per assistant token over all batches and ranks (nan when there is none)."""
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for inputs, targets in batches:
        with autocast:
            total += model(inputs, targets, loss_reduction="sum").double()
        count += (targets >= 0).sum()
    all_reduce_sum(total), all_reduce_sum(count)
    return (total / count).item() if count.item() > 0 else float("nan")


def train_micro_steps(model, batches, world_size, autocast=nullcontext()):
    """Forward + backward over one step's micro-batches; returns the step's loss per assistant token.
    The distributed optimizers average gradients over ranks, hence the factor world_size."""
    device = batches[0][1].device
    n_tokens = all_reduce_sum(sum((targets >= 0).sum() for _, targets in batches).float()).clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    for inputs, targets in batches:
        with autocast:
            loss = model(inputs, targets, loss_reduction="sum")
        (loss * (world_size / n_tokens)).backward()
        loss_sum += loss.detach()
    return (all_reduce_sum(loss_sum) / n_tokens).item()  # also syncs the device: honest timings


# -----------------------------------------------------------------------------
# The fine-tuning loop of mid_train and chat_sft

def finetune(stage, source, source_stage, train_task, val_task, tokenizer, opts, user_config,
             extra_eval=None, pack=True):
    """
    Continue training the checkpoint `source` (a checkpoint argument, see resolve_checkpoint) on
    train_task; write `<stage>_checkpoints/<tag>` (tag: opts["model_tag"] or the source's tag).
    opts: the script's options (see scripts/mid_train.py). extra_eval(model, step) -> dict of
    metrics, called on rank 0 with each val loss. Same logging, checkpoints, resume (--resume),
    Ctrl-C and DDP behaviour as scripts/base_train.py.
    LoRA (opts lora_rank > 0, lora_alpha, lora_targets, lora_lr): the source's weights stay frozen
    and only adapters train (AdamW at lora_lr); each save writes the merged model (a normal
    checkpoint) and the adapter alone (adapter_<step>.pt, see nanochat/lora.py); --resume reloads
    the source + that adapter.
    """
    o = opts
    device_type = o["device_type"] or autodetect_device_type()
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    master = rank == 0
    seed_everything(o["seed"])
    dtype = compute_dtype(device_type)
    autocast = torch.amp.autocast(device_type=device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    wandb_run = init_wandb(o["run"], user_config, master, use_dummy_wandb=o["use_dummy_wandb"])

    # model: the source checkpoint, or this stage's newest checkpoint when resuming
    try:
        source_dir, source_step = resolve_checkpoint(source, default_stage=source_stage)
    except CheckpointError as e:
        raise SystemExit(f"{stage}: {e}") from None
    checkpoint_dir = os.path.join(stage_dir(stage), o["model_tag"] or os.path.basename(source_dir))
    resume_step = None
    if o["resume"]:
        resume_step = find_last_step(checkpoint_dir)
        if resume_step is None:
            print0(f"resume: no checkpoint in {checkpoint_dir}, starting from {source_dir} step {source_step}")
    lora_rank = o.get("lora_rank", 0)
    try:
        orig_model, meta, loaded = lora.build_trainable(source_dir, source_step, checkpoint_dir, resume_step, device,
                                                        lora_rank, o.get("lora_alpha"), o.get("lora_targets"))
    except (CheckpointError, lora.LoRAError) as e:
        raise SystemExit(f"{stage}: {e}") from None
    source_meta = meta
    model_config = meta["model_config"]
    if model_config["vocab_size"] != tokenizer.get_vocab_size():
        raise SystemExit(f"{meta['checkpoint_file']}: vocab size {model_config['vocab_size']} does not match the "
                         f"tokenizer's {tokenizer.get_vocab_size()}")
    model = torch.compile(orig_model, dynamic=False) if o["compile"] and device_type == "cuda" else orig_model
    B = o["device_batch_size"]
    T = o["max_seq_len"] or model_config["sequence_len"]
    examples_per_micro_step = B * world_size
    if o["target_examples_per_step"] % examples_per_micro_step:
        raise SystemExit(f"target_examples_per_step {o['target_examples_per_step']} must be a multiple of "
                         f"device_batch_size*world_size = {examples_per_micro_step}")
    grad_accum_steps = max(1, o["target_examples_per_step"] // examples_per_micro_step)
    rows_per_step = examples_per_micro_step * grad_accum_steps
    epoch_rows = estimate_rows_per_epoch(train_task, tokenizer, T, pack)
    num_iterations = o["num_iterations"]
    if num_iterations <= 0:  # one epoch of the mixture
        num_iterations = max(1, epoch_rows // rows_per_step)
    print0(f"{stage}: from {loaded} | model: {model_config}")
    if lora_rank > 0:
        trainable, total = lora.count_parameters(orig_model)
        print0(f"LoRA: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    print0(f"train: {len(train_task):,} conversations | val: {len(val_task):,} | batch: {rows_per_step} rows = "
           f"{B} x {world_size} ranks x {grad_accum_steps} accum of {T} tokens | steps: {num_iterations:,}")

    if lora_rank > 0:
        optimizers = lora.setup_optimizers(orig_model, o["lora_lr"], weight_decay=o["weight_decay"])
    else:
        optimizers = orig_model.setup_optimizers(unembedding_lr=o["unembedding_lr"], embedding_lr=o["embedding_lr"],
                                                 matrix_lr=o["matrix_lr"], weight_decay=o["weight_decay"])
        for opt in optimizers:  # fine-tuning starts from a fraction of the pretraining learning rates
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] = group["initial_lr"] * o["init_lr_frac"]

    start_step, loader_states, val_loss = 0, None, None
    history = {"step": [], "loss": [], "val_step": [], "val_loss": []}
    if resume_step is not None:
        _, saved_train_state, meta = load_checkpoint(checkpoint_dir, resume_step, device, load_optimizer=True, rank=rank)
        if bool(meta.get("lora")) != (lora_rank > 0):
            raise SystemExit(f"resume: {meta['checkpoint_file']} was trained {'with' if meta.get('lora') else 'without'} "
                             f"LoRA; resume with the same --lora_rank ({(meta.get('lora') or {}).get('rank', 0)})")
        loader_states = restore_train_state(saved_train_state, optimizers, world_size * grad_accum_steps)
        start_step, history, val_loss = meta["step"], meta["history"], meta.get("val_loss")
        print0(f"resumed from {checkpoint_dir} step {start_step}")
        del saved_train_state

    num_lanes = world_size * grad_accum_steps
    train_loaders = [conversation_batches(train_task, tokenizer, B, T, device, lane=rank * grad_accum_steps + k,
                                          num_lanes=num_lanes, state=loader_states[k] if loader_states else None,
                                          pack=pack)
                     for k in range(grad_accum_steps)]
    loader_states = [dict(s) for s in loader_states] if loader_states else [None] * grad_accum_steps

    tokenizer_hash = tokenizer_fingerprint(tokenizer)
    if master:  # what this run trains on, per task, beside its config snapshot
        stats = task_stats(train_task, val_task, tokenizer, round(num_iterations * rows_per_step * len(train_task) / epoch_rows))
        write_stats(checkpoint_dir, stats)
        print0(format_stats(stats))

    def save(step):
        """Every rank writes its optimizer + data position; rank 0 the model and the meta."""
        meta = {"step": step, "val_loss": val_loss, "model_config": model_config, "config": user_config,
                "tokenizer_vocab_size": tokenizer.get_vocab_size(), "tokenizer_hash": tokenizer_hash, "history": history,
                "num_iterations": num_iterations, "source": f"{source_dir} step {source_step}"}
        if lora_rank > 0:  # the adapter first: a complete checkpoint (meta written last) always has its adapter
            meta["lora"] = {"rank": lora_rank, "alpha": o["lora_alpha"], "targets": o["lora_targets"],
                            "adapter": os.path.basename(lora.adapter_path(checkpoint_dir, step))}
            if master:
                lora.save_adapter(lora.adapter_path(checkpoint_dir, step), orig_model, source_meta,
                                  extra={"stage": stage, "step": step})
        model_state = lora.merged_state_dict(orig_model) if lora_rank > 0 else orig_model.state_dict()
        save_checkpoint(checkpoint_dir, step, model_state, train_state(optimizers, loader_states, num_lanes),
                        meta, rank=rank, keep_last=o["keep_last"])
        if lora_rank > 0 and master:
            lora.prune_adapters(checkpoint_dir, list_steps(checkpoint_dir))
        if master:
            write_json_atomic(os.path.join(checkpoint_dir, "config.json"), {**user_config, "num_iterations": num_iterations})
            plot_loss_curve(os.path.join(checkpoint_dir, "loss_curve.png"), history["step"], history["loss"],
                            f"{stage}: train loss", val_steps=history["val_step"], val_values=history["val_loss"],
                            val_label="val loss")
        print0(f"saved {checkpoint_dir} step {step}")

    graceful = GracefulExit()
    memory_guard = MemoryGuard(o["max_memory_frac"])
    eta = ETA(total_steps=num_iterations, start_step=start_step)
    peak_flops = get_peak_flops(device)
    flops_per_token = orig_model.estimate_flops()
    t_start = time.time()
    step = start_step
    last_metrics = {}
    while True:
        last_step = step == num_iterations
        if o["eval_every"] > 0 and (last_step or step % o["eval_every"] == 0) and (step > start_step or step == 0):
            model.eval()
            val_batches = conversation_eval_batches(val_task, tokenizer, B, T, device, lane=rank, num_lanes=world_size,
                                                    max_examples=o["eval_examples"])
            val_loss = evaluate_loss(model, val_batches, device, autocast)
            history["val_step"].append(step)
            history["val_loss"].append(val_loss)
            metrics = {}
            if extra_eval is not None and master:
                with autocast:
                    metrics = extra_eval(orig_model, step)
                last_metrics = metrics
            model.train()
            print0(f"step {step:05d} | val loss {val_loss:.4f}" + "".join(f" | {k} {v:.3f}" for k, v in metrics.items()))
            wandb_run.log({"step": step, "val/loss": val_loss, **{f"val/{k}": v for k, v in metrics.items()}})

        if save_or_stop(step, last_step, start_step, o["save_every"], graceful, memory_guard, device, save):
            break

        # one optimization step: grad_accum_steps micro-batches, each from its own data lane
        t0 = time.time()
        batches = []
        for k in range(grad_accum_steps):
            inputs, targets, loader_states[k] = next(train_loaders[k])
            batches.append((inputs, targets))
        loss_value = train_micro_steps(model, batches, world_size, autocast)
        if o["grad_clip"] > 0:
            clip_grad_norm(orig_model, optimizers, o["grad_clip"])
        lrm = lr_multiplier(step, num_iterations, o["warmup_ratio"], o["warmdown_ratio"], o["final_lr_frac"])
        set_schedule(optimizers, lrm, step)
        for opt in optimizers:
            opt.step()
        orig_model.zero_grad(set_to_none=True)
        dt = time.time() - t0
        eta.update(dt)
        step += 1

        tok_per_sec = rows_per_step * T / dt
        mfu = flops_per_token * tok_per_sec / (peak_flops * world_size) if peak_flops else None
        history["step"].append(step)
        history["loss"].append(loss_value)
        print0(format_step_line(step, num_iterations, loss_value, lrm, tok_per_sec, mfu, time.time() - t_start, eta))
        wandb_run.log({"step": step, "train/loss": loss_value, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec})

    graceful.close()
    wandb_run.finish()
    if master and history["loss"]:
        report_stage = {"mid": "MID", "chatsft": "SFT"}.get(stage)
        report.log_section({"mid": "Mid-training", "chatsft": "Chat SFT"}.get(stage, stage), config=user_config,
                           plots=[os.path.join(checkpoint_dir, "loss_curve.png")], stage=report_stage,
                           metrics={"checkpoint": f"{checkpoint_dir} step {step}", "source": f"{source_dir} step {source_step}",
                                    "steps": step, "final train loss": history["loss"][-1], "val loss": val_loss,
                                    **last_metrics, "wall minutes": round((time.time() - t_start) / 60, 2)},
                           summary={"val loss": val_loss} if val_loss is not None else {})
    compute_cleanup()
    exit_if_stopped(step, num_iterations, graceful)
    return orig_model
