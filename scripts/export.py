"""
Take a model anywhere: write a checkpoint as a Hugging Face transformers directory
(NanoChatForCausalLM; AutoModelForCausalLM / AutoTokenizer load it without custom code, vLLM
serves it), or turn such a directory back into a checkpoint of ours.

    python -m scripts.export --checkpoint=chatsft_checkpoints/latest --out=hf/my-chat
    python -m scripts.export --checkpoint=base_checkpoints/d20 --out=hf/d20 --dtype=bfloat16 --force
    python -m scripts.export --from_hf=hf/my-chat --stage=chatsft --model_tag=imported

Export: config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json (with the chat template) and README.md (the model card) are written to a
temp dir beside --out and renamed to it at the end: a failed export leaves nothing behind.
Import: the tokenizer is rebuilt into <base>/tokenizer (refused when a different one is there:
the checkpoints trained with it would stop matching) and the weights become step 0 of
<base>/<stage>_checkpoints/<model_tag>, so chat_cli, chat_eval, chat_sft ... take it as theirs.
MoE checkpoints are refused: transformers has no mixture-of-experts NanoChat. GGUF: see README.
"""
import os
import sys

if __package__ in (None, ""):  # also runnable as `python scripts/export.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json
import shlex
import shutil
import tempfile
import time
from dataclasses import asdict

import torch

from nanochat import hf_export, report
from nanochat.checkpoint_manager import (STAGES, CheckpointError, build_model, check_compatible, list_steps,
                                         resolve_checkpoint, save_checkpoint, stage_dir)
from nanochat.common import get_base_dir
from nanochat.configurator import configure
from nanochat.lora import LoRAError, load_merged
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer, tokenizer_fingerprint

# ----------------------------------------------------------------------------- defaults
checkpoint = "chatsft_checkpoints/latest"  # export: any stage's checkpoint (base_checkpoints/d20, .../model_000500.pt)
adapter = ""            # export: a LoRA adapter file (adapter_<step>.pt) merged into the checkpoint first
out = ""                # export: the directory to write; must not exist or be empty (else --force)
dtype = "float32"       # export: weights as float32 | bfloat16
from_hf = ""            # import: a NanoChat-format Hugging Face directory (instead of exporting)
stage = "chatsft"       # import: the stage to file it under (base, mid, chatsft, ...)
model_tag = ""          # import: its model tag; default the directory's name
force = False           # replace a non-empty --out / the model tag's checkpoints / a different tokenizer
verify = False          # export: load the result with transformers and compare it with ours (needs transformers)
user_config = configure(globals())
# -----------------------------------------------------------------------------
COMMAND = "python -m scripts.export " + " ".join(shlex.quote(a) for a in sys.argv[1:])
ERRORS = (CheckpointError, LoRAError, hf_export.ExportError, OSError, ValueError, ImportError)  # no safetensors: Import


def fail(message):
    raise SystemExit(f"export: {str(message).splitlines()[0]}")  # one line; details are in the message's head


REPORT_STAGE = {"base": "BASE", "mid": "MID", "chatsft": "SFT", "chatdpo": "DPO", "chatrl": "RL", "distill": "DISTILL"}


def report_metrics(meta, stage_name):
    """(name, value) rows for the card: the checkpoint's own val metric, then the report's summary
    rows of its stage and the stages before it (later stages describe other models)."""
    rows = [(k, meta[k]) for k in ("val_bpb", "val_loss") if isinstance(meta.get(k), float)]
    last = report.STAGE_ORDER.index(REPORT_STAGE.get(stage_name, "DISTILL"))
    columns, stage_rows = report.summary_rows(report.read_sections())
    rows += [(f"{row[0]} {col}", value) for row in stage_rows if report.STAGE_ORDER.index(row[0]) <= last
             for col, value in zip(columns, row[1:]) if value != "-"]
    return rows


def verification_texts(n=8):
    """Validation documents (never tokenizer training text), English and Chinese, where the corpus
    is here; then the export's probe texts (digits, whitespace, CJK, emoji, code)."""
    from nanochat.dataset import parquets_iter_batched
    try:
        texts = [t for batch in parquets_iter_batched("val") for t in batch]
    except (OSError, ValueError):
        texts = []
    english = [t for t in texts if t.isascii()][:n]
    chinese = [t for t in texts if sum("\u4e00" <= ch <= "\u9fff" for ch in t) > len(t) // 4][:n]
    return english + chinese + hf_export.PROBE_TEXTS


def make_readable(directory):
    """mkdtemp makes a private directory (and safetensors a private file): give them the usual
    permissions, as any other directory the user creates."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def data_summary(checkpoint_dir):
    from nanochat.data_stats import format_stats
    path = os.path.join(checkpoint_dir, "dataset_stats.json")
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return format_stats(json.load(f))


t0 = time.time()
if not from_hf:
    # ------------------------------------------------------------------------- export
    if not out:
        fail("--out=DIR is required (or --from_hf=DIR to import a Hugging Face directory)")
    if dtype not in hf_export.DTYPES:
        fail(f"--dtype={dtype}: expected one of {', '.join(hf_export.DTYPES)}")
    out = os.path.abspath(out)
    if os.path.exists(out) and not (os.path.isdir(out) and (not os.listdir(out) or force)):
        fail(f"{out} exists and is not an empty directory (pass --force to replace it)")
    try:
        checkpoint_dir, step = resolve_checkpoint(checkpoint, default_stage="chatsft")
        if adapter:
            model, meta = load_merged(checkpoint_dir, step, adapter, "cpu")
        else:
            model, meta = build_model(checkpoint_dir, step, "cpu")
        hf_export.check_exportable(model.config)
        tokenizer = get_tokenizer()
        check_compatible(meta, tokenizer)
    except ERRORS as e:
        fail(e)
    stage_name = os.path.basename(os.path.dirname(checkpoint_dir)).removesuffix("_checkpoints")
    source = f"{checkpoint_dir} step {step}" + (f" + LoRA adapter {adapter} (merged)" if adapter else "")
    card = hf_export.model_card(os.path.basename(out), stage_name, model, source, COMMAND,
                                report_metrics(meta, stage_name), data_summary(checkpoint_dir))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        hf_export.save_hf_dir(tmp, model, tokenizer, dtype, card)
        make_readable(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)  # empty, or --force
        os.rename(tmp, out)
    except ERRORS as e:
        fail(e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {source} ({model.num_params():,} parameters, {dtype}) to {out} in {time.time() - t0:.1f}s")
    print(f'load it: AutoModelForCausalLM.from_pretrained("{out}"), AutoTokenizer.from_pretrained("{out}")')
    if verify:
        conversation = [{"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": "What is the capital of France?"},
                        {"role": "assistant", "content": "Paris."},
                        {"role": "user", "content": "你好！And of Japan?"}]
        texts = verification_texts()
        with torch.no_grad():  # compare like with like: our model with the exported weights' rounding
            for p in model.parameters():
                p.copy_(p.to(hf_export.DTYPES[dtype]).float())
        try:
            v = hf_export.verify_export(out, model, tokenizer, texts, conversation)
        except ImportError as e:
            fail(f"--verify needs transformers (pip install 'transformers>=5'): {e}")
        rounded = f"; ours rounded to {dtype} as exported" if dtype != "float32" else ""
        print(f"verify: logits max |diff| {v['max_logit_diff']:.2e} over {v['texts']} texts (fp32, CPU{rounded}); "
              f"tokenizer ids equal on {v['ids_equal']}/{v['texts']}; chat template "
              f"{'equal' if v['template_equal'] else 'DIFFERENT'}; greedy: {v['greedy_agree']} tokens agree "
              f"(ours {v['greedy_ours']}, transformers {v['greedy_theirs']})"
              + (" up to our calculator tool call" if v["tool_call"] else ""))
        ok = (v["max_logit_diff"] < 1e-4 and v["ids_equal"] == v["texts"]
              and v["template_equal"] and v["greedy_equal"])
        if not ok:
            fail("verify: the export does not match this model (numbers above)")
else:
    # ------------------------------------------------------------------------- import
    hf_dir = os.path.abspath(from_hf)
    if stage not in STAGES:
        fail(f"--stage={stage}: expected one of {', '.join(STAGES)}")
    model_tag = model_tag or os.path.basename(hf_dir)
    config_path = os.path.join(hf_dir, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf_cfg = json.load(f)
        config = hf_export.gpt_config_from_hf(hf_cfg, config_path)
        tokenizer = hf_export.tokenizer_from_hf(hf_dir)
        if tokenizer.get_vocab_size() != config.vocab_size:
            fail(f"{hf_dir}: the tokenizer has {tokenizer.get_vocab_size()} tokens, the model {config.vocab_size}; "
                 f"nanochat needs them equal")
        state = hf_export.state_dict_from_hf(hf_export.read_safetensors(hf_dir), config, hf_dir)
    except ERRORS as e:
        fail(e)
    # Everything is checked; now the two writes, each atomic: tokenizer, then the checkpoint.
    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    fingerprint = tokenizer_fingerprint(tokenizer)
    try:
        same = tokenizer_fingerprint(RustBPETokenizer.from_directory(tokenizer_dir)) == fingerprint
    except ERRORS:
        same = False  # none yet, or unreadable (replaced only with --force, below)
    if os.path.exists(tokenizer_dir) and not same and not force:
        fail(f"{tokenizer_dir} holds a different tokenizer, which the checkpoints trained with it need: import under "
             f"another NANOCHAT_BASE_DIR (or pass --force to replace it)")
    checkpoint_dir = os.path.join(stage_dir(stage), model_tag)
    if list_steps(checkpoint_dir) and not force:
        fail(f"{checkpoint_dir} already has checkpoints (choose another --model_tag or pass --force to replace them)")
    if not same:
        tokenizer.save(tokenizer_dir, metadata={"imported_from": hf_dir})
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # --force: the old model's steps would shadow step 0
    meta = {"model_config": asdict(config), "tokenizer_vocab_size": tokenizer.get_vocab_size(),
            "tokenizer_hash": fingerprint, "source": f"imported from {hf_dir}", "config": user_config}
    save_checkpoint(checkpoint_dir, 0, state, None, meta)
    eps = hf_cfg.get("rms_norm_eps")
    if eps is not None and eps != hf_export.RMS_NORM_EPS:
        print(f"note: {config_path} has rms_norm_eps={eps:g}; nanochat's norm adds {hf_export.RMS_NORM_EPS:.3g}, "
              f"so logits differ from transformers' by a rounding-sized amount")
    print(f"imported {hf_dir} as {checkpoint_dir} step 0 ({sum(v.numel() for v in state.values()):,} parameters) "
          f"and its tokenizer into {tokenizer_dir} in {time.time() - t0:.1f}s")
