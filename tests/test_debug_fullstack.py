"""
scripts/debug_fullstack.py in each mode (pretrain, sft, dpo) as a subprocess, on a tiny base dir
(a 512-token tokenizer trained here, a slice of the real corpus): the sections are printed, the
shapes match the batch, the gradient norm is finite, the loss mask marks assistant tokens only
(sft, dpo: the final reply only), Chinese text comes out intact, and --checkpoint loads a model.
Run: nice -n 10 python -m pytest tests/test_debug_fullstack.py -q
"""
import json
import math
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataset import parquets_iter_batched
from nanochat.tokenizer import RustBPETokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ["1. setup", "2. model", "3. batch", "4. one optimizer step", "5. generate"]
TABLE_RE = re.compile(r"^\s*(\d+)\s+(\d+)\s+(-?\d+)\s+(yes|-)\s+(.*)$")
ZH_REPLY = "我来算一下。"
CONVERSATION = {"conversations": [
    {"role": "user", "content": "你好！What is 12 plus 30?"},
    {"role": "assistant", "content": [{"type": "text", "text": ZH_REPLY}, {"type": "python", "text": "12+30"},
                                      {"type": "python_output", "text": "42"}, {"type": "text", "text": "The answer is 42."}]},
    {"role": "user", "content": "谢谢"},
    {"role": "assistant", "content": "不客气。"}]}


@pytest.fixture(scope="module")
def tokenizer(default_data_dir):
    texts = []
    for batch in parquets_iter_batched("train", data_dir=default_data_dir):
        texts.extend(t[:1500] for t in batch)
        if len(texts) >= 200:
            break
    return RustBPETokenizer.train_from_iterator(texts[:200] + ["你好！我来算一下。谢谢不客气 The answer is"] * 20, 512)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer, default_data_dir):
    """Tokenizer, a corpus slice and the spelling word list (linked from the real cache: no network)."""
    from nanochat.common import get_base_dir
    wheel = os.path.join(get_base_dir(), "package_cache", "reasoning_gym-0.1.25-py3-none-any.whl")
    if not os.path.exists(wheel):
        pytest.skip("the spelling word list is not cached: run `python -m nanochat.tasks` once (needs PyPI)")
    base = tmp_path_factory.mktemp("nanochat_debug")
    (base / "package_cache").mkdir()
    os.symlink(wheel, base / "package_cache" / os.path.basename(wheel))
    texts = next(parquets_iter_batched("val", data_dir=default_data_dir))[:60]
    (base / "base_data").mkdir()
    pq.write_table(pa.table({"text": texts, "source": ["test"] * len(texts)}), str(base / "base_data" / "train_00000.parquet"))
    tokenizer.save(str(base / "tokenizer"))
    return base


def run(base_dir, *args):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "scripts.debug_fullstack", "--device_type=cpu", "--depth=1",
                           "--max_tokens=6", *args], cwd=REPO, env=env, capture_output=True, timeout=120)
    out = proc.stdout.decode("utf-8")  # strict: a mangled character fails here
    assert proc.returncode == 0, f"debug_fullstack failed ({proc.returncode}):\n{out[-3000:]}\n{proc.stderr.decode()[-3000:]}"
    return out


def sections(out):
    """{title: text} of the '===== title =====' sections, which must all be there, in order."""
    titles = re.findall(r"^=+ (.+?) =+$", out, re.M)
    assert [t.split(" (")[0] for t in titles] == SECTIONS, titles
    parts = re.split(r"^=+ .+? =+$", out, flags=re.M)[1:]
    return {t.split(" (")[0]: p for t, p in zip(titles, parts)}


def token_tables(batch_text):
    """The token tables of the shown rows: lists of (pos, input id, target id, trained)."""
    tables = []
    for line in batch_text.splitlines():
        if line.lstrip().startswith("pos "):
            tables.append([])
        m = TABLE_RE.match(line)
        if m and tables:
            tables[-1].append((int(m[1]), int(m[2]), int(m[3]), m[4] == "yes"))
    return tables


def check_step(step_text):
    before = float(re.search(r"^loss before: ([-0-9.e+]+)", step_text, re.M)[1])
    after = float(re.search(r"^loss after: +([-0-9.e+]+)", step_text, re.M)[1])
    norm = float(re.search(r"^global grad norm: ([-0-9.e+naif]+)", step_text, re.M)[1])
    assert math.isfinite(before) and math.isfinite(after)
    assert math.isfinite(norm) and norm > 0
    groups = [float(v) for v in re.findall(r"^  (?:AdamW|Muon)\[\d+\] .*? ([0-9.e+-]+)$",
                                           step_text.split("grad norm per optimizer group:")[1].split("clipped")[0], re.M)]
    assert len(groups) >= 3 and abs(math.sqrt(sum(g * g for g in groups)) - norm) < 1e-4 * max(1, norm)
    return before, after


def shapes(batch_text):
    return {name: tuple(int(x) for x in dims.split(",") if x.strip()) for name, dims in
            re.findall(r"^(inputs|targets|loss mask) +shape \(([\d, ]+)\)", batch_text, re.M)}


def assistant_positions(tokenizer, ids, final_only=False):
    """Independently of the render mask: is ids[i] an assistant token the model is trained to write
    (its text, tool calls and <|assistant_end|>; not tool output, not user text, not padding)?"""
    sp = tokenizer.encode_special
    out, state = [], "outside"
    for tok in ids:
        if tok in (sp("<|user_start|>"), sp("<|assistant_start|>"), sp("<|output_start|>")):
            state = {sp("<|user_start|>"): "user", sp("<|assistant_start|>"): "assistant", sp("<|output_start|>"): "output"}[tok]
            out.append(False)
        elif tok == sp("<|output_end|>"):
            state = "assistant"
            out.append(False)
        elif tok in (sp("<|user_end|>"), tokenizer.get_bos_token_id()):
            state = "outside"
            out.append(False)
        else:
            out.append(state == "assistant")
            if tok == sp("<|assistant_end|>"):
                state = "outside"
    if final_only:  # DPO: only the last assistant turn counts
        last = max(i for i, t in enumerate(ids) if t == sp("<|assistant_start|>"))
        out = [m and i > last for i, m in enumerate(out)]
    return out


def check_mask(tokenizer, table, final_only=False):
    ids = [inp for _, inp, _, _ in table]
    want = assistant_positions(tokenizer, ids, final_only)
    for pos, inp, target, trained in table[:-1]:
        assert trained == want[pos + 1], (pos, tokenizer.id_to_token(ids[pos + 1]), trained)
        assert target == (ids[pos + 1] if trained else -1)
    assert any(want) and not all(want[1:])


def test_pretrain(base_dir, tokenizer):
    out = run(base_dir, "--mode=pretrain", "--max_seq_len=48", "--device_batch_size=3", "--show_tokens=48",
              "--prompt=你好")
    s = sections(out)
    assert shapes(s["3. batch"]) == {"inputs": (3, 48), "targets": (3, 48), "loss mask": (3, 48)}
    assert "parameters: " in s["2. model"] and re.search(r"lm_head\.weight +\(\d+, 64\)", s["2. model"])
    [table] = token_tables(s["3. batch"])
    assert [p for p, *_ in table] == list(range(48))
    assert all(trained for *_, trained in table)  # pretraining: every target counts
    for (_, _, target, _), (_, nxt, _, _) in zip(table, table[1:]):
        assert target == nxt  # targets are the inputs shifted by one
    assert "#" * 48 in s["3. batch"]
    before, after = check_step(s["4. one optimizer step"])
    assert after < before  # one step on the same batch lowers its loss
    gen = s["5. generate"]
    assert "prompt: 你好" in gen and re.search(r"^generated ids \(\d+", gen, re.M) and "generated text: " in gen
    bos = tokenizer.get_bos_token_id()
    assert f"prompt ids: {[bos] + tokenizer.encode('你好')}" in gen


def test_sft_user_conversation_chinese_and_tool_mask(base_dir, tokenizer, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps(CONVERSATION, ensure_ascii=False) + "\n", encoding="utf-8")
    out = run(base_dir, "--mode=sft", f"--data_path={data}", "--generated_examples=0", "--identity_examples=0",
              "--device_batch_size=1", "--max_seq_len=96", "--show_tokens=96", "--prompt=你是谁？")
    s = sections(out)
    batch = s["3. batch"]
    assert shapes(batch) == {"inputs": (1, 96), "targets": (1, 96), "loss mask": (1, 96)}
    ids, mask = tokenizer.render_conversation(CONVERSATION)
    # raw text: the conversation, intact (Chinese included), then the padding summarised
    assert tokenizer.decode(ids) + f" + <|bos|> x {96 - len(ids)} (padding, ignored)" in batch
    [table] = token_tables(batch)
    assert [inp for _, inp, _, _ in table] == ids[:len(table)] and len(table) >= len(ids) - 1
    check_mask(tokenizer, table)
    assert [trained for *_, trained in table][:len(ids) - 1] == [bool(m) for m in mask[1:]]
    # the compact view marks the assistant's text, never the user's or the tool output
    marked = re.findall(r"\[\[(.*?)\]\]", batch.split("trained targets in [[ ]]")[1].split("\n", 1)[1].split("\n")[0])
    assert marked == [ZH_REPLY + "<|python_start|>12+30<|python_end|>", "The answer is 42.<|assistant_end|>",
                      "不客气。<|assistant_end|>"]
    check_step(s["4. one optimizer step"])
    gen = s["5. generate"]
    assert "prompt: 你是谁？" in gen
    assert f"prompt ids: {tokenizer.render_for_completion({'conversations': [{'role': 'user', 'content': '你是谁？'}]})}" in gen


def test_sft_mixture(base_dir, tokenizer):
    out = run(base_dir, "--mode=sft", "--generated_examples=20", "--identity_examples=10", "--device_batch_size=2",
              "--max_seq_len=64", "--show_rows=2", "--show_tokens=64", "--pack=True")
    s = sections(out)
    assert "Identity 10, Arithmetic 20, Spelling 20" in s["3. batch"]
    assert shapes(s["3. batch"]) == {"inputs": (2, 64), "targets": (2, 64), "loss mask": (2, 64)}
    tables = token_tables(s["3. batch"])
    assert len(tables) == 2
    for table in tables:  # packed rows: several conversations, still only assistant tokens trained
        check_mask(tokenizer, table)
    check_step(s["4. one optimizer step"])


def test_dpo_from_checkpoint(base_dir, tokenizer, tmp_path):
    """A depth-1 checkpoint saved here is loaded with --checkpoint; pairs from a user file."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, config_from_depth
    torch.manual_seed(0)
    config = config_from_depth(1, vocab_size=tokenizer.get_vocab_size(), sequence_len=64)
    model = GPT(config)
    model.init_weights()
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "tiny"), 7, model.state_dict(), None,
                    {"step": 7, "model_config": config.__dict__})
    data = tmp_path / "prefs.jsonl"
    pairs = [{"prompt": "你好吗？", "chosen": "我很好，谢谢。", "rejected": "走开。"},
             {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}]
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    out = run(base_dir, "--mode=dpo", "--checkpoint=chatsft_checkpoints/tiny", f"--data_path={data}",
              "--device_batch_size=2", "--show_tokens=100")
    s = sections(out)
    assert "loaded " in s["1. setup"] and "chatsft_checkpoints/tiny step 7" in s["1. setup"]
    batch = s["3. batch"]
    rows, length = shapes(batch)["inputs"]
    assert rows == 4 and shapes(batch) == {"inputs": (4, length), "targets": (4, length), "loss mask": (4, length)}
    assert 'prompt "你好吗？"' in batch and 'chosen   reply: "我很好，谢谢。"' in batch and 'rejected reply: "走开。"' in batch
    tables = token_tables(batch)
    assert len(tables) == 2  # pair 0: its chosen row and its rejected row
    for table in tables:
        check_mask(tokenizer, table, final_only=True)
    step = s["4. one optimizer step"]
    before, after = check_step(step)
    assert abs(before - math.log(2)) < 1e-5  # the policy starts as the reference
    assert after < before and "reward accuracy" in step
