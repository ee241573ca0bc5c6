"""
Our checkpoints and tokenizer <-> a Hugging Face transformers NanoChat directory
(model_type "nanochat", NanoChatForCausalLM), the format transformers and vLLM load with no
custom code. scripts/export.py drives it; these are the conversions, each checked by
tests/test_export.py against transformers itself.

The two models are the same function when the details line up:
- weights: same layout (nn.Linear (out, in), heads contiguous in q/k/v); only the names differ
- rotary: transformers' NanoChat rotates pairs (i, i + D/2) as x*cos + (x2, -x1)*sin, which is
  ours (gpt.apply_rotary_emb), QK-norm after rotary in both, base 10000 (gpt.py's default)
- RMSNorm: parameter-free in both, also right after the embedding; ours is F.rms_norm with
  eps=None, which adds torch.finfo(float32).eps (its op-math type's, for bf16 inputs too), so
  rms_norm_eps is that number, not transformers' default 1e-6
- soft-cap: softcap * tanh(logits / softcap) in both; untied embeddings; GQA by repeating kv heads
A mixture-of-experts model has no counterpart (NanoChatForCausalLM is dense) and is refused.
"""
import json
import os

import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer

HF_ARCHITECTURE = "NanoChatForCausalLM"
HF_MODEL_TYPE = "nanochat"
ROPE_THETA = 10000.0  # gpt.GPT._precompute_rotary's base
RMS_NORM_EPS = torch.finfo(torch.float32).eps  # what F.rms_norm(eps=None) adds (fp32 and bf16 inputs alike)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ExportError(ValueError):
    """The model, tokenizer or directory cannot be converted; the message says why."""


# -----------------------------------------------------------------------------
# Model config

def check_exportable(config: GPTConfig):
    if config.n_experts:
        raise ExportError(f"a mixture-of-experts model (n_experts={config.n_experts}) has no standard architecture: "
                          f"transformers' NanoChatForCausalLM (and vLLM, llama.cpp) only know the dense ReLU^2 MLP, "
                          f"so there is nothing to export it to")


def hf_config(config: GPTConfig, tokenizer, dtype: str) -> dict:
    """config.json of a NanoChatForCausalLM equal to our GPT of `config`."""
    check_exportable(config)
    sp = tokenizer.encode_special
    return {
        "architectures": [HF_ARCHITECTURE], "model_type": HF_MODEL_TYPE,
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd, "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2", "attention_bias": False, "attention_dropout": 0.0,
        "rms_norm_eps": RMS_NORM_EPS, "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "final_logit_softcapping": float(config.softcap), "tie_word_embeddings": False,
        "initializer_range": 0.02, "use_cache": True, "dtype": dtype,
        "rope_theta": ROPE_THETA, "torch_dtype": dtype,  # the same, for transformers 4.x readers
        # pad is a stop token, so generate never infers an attention mask from it (our prompts contain it)
        "bos_token_id": tokenizer.get_bos_token_id(), "eos_token_id": sp("<|assistant_end|>"),
        "pad_token_id": sp("<|assistant_end|>"),
    }


def generation_config(tokenizer) -> dict:
    """Stop where our Engine stops: at <|assistant_end|> and at <|bos|> (a new document)."""
    sp = tokenizer.encode_special
    return {"bos_token_id": tokenizer.get_bos_token_id(),
            "eos_token_id": [sp("<|assistant_end|>"), tokenizer.get_bos_token_id()],
            "pad_token_id": sp("<|assistant_end|>")}


def gpt_config_from_hf(cfg: dict, where: str) -> GPTConfig:
    """Our GPTConfig for a NanoChat config.json, or ExportError naming the field we cannot represent."""
    if cfg.get("model_type") != HF_MODEL_TYPE:
        raise ExportError(f"{where}: model_type {cfg.get('model_type')!r} is not {HF_MODEL_TYPE!r} "
                          f"(architectures {cfg.get('architectures')}): only NanoChat directories can be imported")
    needed = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
    missing = [key for key in needed if not isinstance(cfg.get(key), int) or cfg[key] <= 0]
    if missing:
        raise ExportError(f"{where}: {', '.join(missing)} missing or not a positive integer")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {"rope_type": "default", "rope_theta": cfg.get("rope_theta", ROPE_THETA)}
    fixed = {"hidden_act": ("relu2", cfg.get("hidden_act", "relu2")),
             "attention_bias": (False, cfg.get("attention_bias", False)),
             "tie_word_embeddings": (False, cfg.get("tie_word_embeddings", False)),
             "intermediate_size": (4 * hidden, cfg.get("intermediate_size")),
             "head_dim": (hidden // heads, cfg.get("head_dim") or hidden // heads),
             "rope_parameters.rope_type": ("default", rope.get("rope_type", "default")),
             "rope_parameters.rope_theta": (ROPE_THETA, float(rope.get("rope_theta", ROPE_THETA)))}
    for field, (want, got) in fixed.items():
        if got != want:
            raise ExportError(f"{where}: {field} is {got!r}; nanochat's GPT has {want!r} (cannot be represented)")
    if not cfg.get("final_logit_softcapping"):
        raise ExportError(f"{where}: final_logit_softcapping is {cfg.get('final_logit_softcapping')!r}; "
                          f"nanochat's GPT always soft-caps its logits")
    try:
        return GPTConfig(sequence_len=cfg["max_position_embeddings"], vocab_size=cfg["vocab_size"],
                         n_layer=cfg["num_hidden_layers"], n_head=heads,
                         n_kv_head=cfg.get("num_key_value_heads") or heads, n_embd=hidden,
                         softcap=float(cfg["final_logit_softcapping"]))
    except (AssertionError, TypeError, ZeroDivisionError) as e:
        raise ExportError(f"{where}: not a usable NanoChat config ({type(e).__name__}: {e})") from None


# -----------------------------------------------------------------------------
# Weights: same tensors, other names

_BLOCK_NAMES = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
                "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def weight_names(n_layer: int) -> dict:
    """{our state-dict key: transformers' key}."""
    names = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        for ours, theirs in _BLOCK_NAMES.items():
            names[f"transformer.h.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def hf_state_dict(state: dict, config: GPTConfig, dtype: torch.dtype) -> dict:
    names = weight_names(config.n_layer)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if set(state) != set(names):
        raise ExportError(f"state dict keys differ from a dense GPT's: extra {sorted(set(state) - set(names))[:4]}, "
                          f"missing {sorted(set(names) - set(state))[:4]}")
    return {theirs: state[ours].detach().to("cpu", dtype).contiguous() for ours, theirs in names.items()}


def state_dict_from_hf(tensors: dict, config: GPTConfig, where: str) -> dict:
    """Our fp32 state dict from transformers' tensors; every tensor must be used and fit the config."""
    names = {theirs: ours for ours, theirs in weight_names(config.n_layer).items()}
    extra, missing = sorted(set(tensors) - set(names)), sorted(set(names) - set(tensors))
    if extra or missing:
        raise ExportError(f"{where}: tensors do not match a dense NanoChat of {config.n_layer} layers: "
                          f"unexpected {extra[:4]}, missing {missing[:4]}")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(config).state_dict().items()}
    state = {}
    for theirs, ours in names.items():
        if tensors[theirs].shape != shapes[ours]:
            raise ExportError(f"{where}: {theirs} has shape {tuple(tensors[theirs].shape)}, the config implies "
                              f"{tuple(shapes[ours])}")
        state[ours] = tensors[theirs].to(torch.float32).contiguous()
    return state


def read_safetensors(hf_dir: str) -> dict:
    """All tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""
    from safetensors.torch import load_file
    single, index = os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        shards = [single]
    elif os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = [os.path.join(hf_dir, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        raise ExportError(f"{hf_dir}: no model.safetensors (nor an index of shards); only safetensors weights are read")
    tensors = {}
    for shard in shards:
        try:
            tensors.update(load_file(shard))
        except Exception as e:  # safetensors' own error type: truncated, corrupt, not safetensors
            raise ExportError(f"{shard}: unreadable ({type(e).__name__}: {e})") from None
    return tensors


# -----------------------------------------------------------------------------
# Tokenizer: our ranks as a byte-level BPE with merges

def byte_to_unicode() -> dict:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the other 68 bytes for
    the code points 256, 257, ... in byte order, so every token is a printable string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TEXT = byte_to_unicode()


def token_text(token: bytes) -> str:
    """A token as it appears in tokenizer.json's vocab and merges."""
    return "".join(BYTE_TEXT[b] for b in token)


def _bpe_parts(token: bytes, ranks: dict, max_rank: int) -> list:
    """BPE on token's bytes with merges of rank < max_rank only (lowest rank first, as tiktoken)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        pairs = [(ranks.get(parts[i] + parts[i + 1], max_rank), i) for i in range(len(parts) - 1)]
        rank, i = min(pairs)
        if rank >= max_rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def bpe_merges(mergeable_ranks) -> list:
    """The merge that makes each token of rank > 255, in rank order: the two pieces a BPE limited
    to lower ranks leaves. A token that does not end as exactly two pieces is not a BPE merge."""
    ranks = dict(mergeable_ranks)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda tr: tr[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise ExportError(f"token {rank} ({token!r}) is not the merge of two lower-rank tokens "
                              f"(BPE leaves {len(parts)} pieces): not a BPE vocabulary")
        merges.append((parts[0], parts[1]))
    return merges


def hf_tokenizer(tokenizer: RustBPETokenizer):
    """A `tokenizers.Tokenizer` that encodes as ours: our split regex, then byte-level BPE with
    the merges of our ranks; the special tokens after them; <|bos|> prepended when asked to add
    special tokens (apply_chat_template does not ask; its template writes <|bos|>)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    ranks = tokenizer.get_mergeable_ranks()
    if any(len(token) != 1 for token, _ in ranks[:256]) or len({t for t, _ in ranks[:256]}) != 256:
        raise ExportError("the first 256 ranks are not the 256 single bytes: not a byte-level BPE")
    vocab = {token_text(token): rank for token, rank in ranks}
    merges = [(token_text(a), token_text(b)) for a, b in bpe_merges(ranks)]
    # ignore_merges: a pre-token that is itself a token maps to it directly, as tiktoken does
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.get_pattern()), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
    bos = tokenizer.get_bos_token_id()
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                      special_tokens=[("<|bos|>", bos)])
    for name in SPECIAL_TOKENS:
        if hf.token_to_id(name) != tokenizer.encode_special(name):
            raise ExportError(f"special token {name} got id {hf.token_to_id(name)}, "
                              f"ours is {tokenizer.encode_special(name)}")
    for text in PROBE_TEXTS:
        if hf.encode(text, add_special_tokens=False).ids != tokenizer.encode(text):
            raise ExportError(f"the split pattern reads differently in transformers' regex engine (Oniguruma; e.g. "
                              f"a possessive interval {{1,3}}+ there means 'one or more times'): {text!r} encodes "
                              f"differently, so the tokenizer cannot be exported as is")
    return hf


# Text where regex engines and BPE conventions part ways: digit runs, contractions, whitespace
# runs before words and line ends, punctuation runs, CJK, emoji, code.
PROBE_TEXTS = ["In 1916, 12345678 people paid $3.50; 2024-06-01T12:00 is 99.9% sure.",
               "It's, they'll, we'VE, I'M, don't; 'quoted' ''double''",
               "  two spaces\t\ttabs   \n\n\n  indented\r\nwindows line\n \n",
               "!!! ??? ... --- === +++ ### @@@ ((( ))) ]]] >>>",
               "中文的句子，还有标点符号。日本語のテキスト、한국어 텍스트。",
               "emoji 😀👍🏽 👨‍👩‍👧 flags 🇫🇷 and symbols ∑∫√ ß ﬁ",
               "def f(x):\n    return {'a': [x**2 for x in range(10)]}  # comment\n"]


# render_conversation's prompt as Jinja: a leading system message joins the first user message
# ("system\n\nuser"); user and assistant alternate; assistant content is text or a list of
# {"type": "text" | "python" | "python_output", "text": ...} parts.
CHAT_TEMPLATE = r"""{%- if messages[0]['role'] == 'system' -%}
{%- if messages|length < 2 or messages[1]['role'] != 'user' -%}
{{- raise_exception('a system message must be followed by a user message') -}}
{%- endif -%}
{%- set system = messages[0]['content'] + '\n\n' -%}
{%- set messages = messages[1:] -%}
{%- else -%}
{%- set system = '' -%}
{%- endif -%}
<|bos|>
{%- for message in messages -%}
{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}
{{- raise_exception('user and assistant must alternate, starting with user (a system message may only come first)') -}}
{%- endif -%}
{%- if message['role'] == 'user' -%}
{{- '<|user_start|>' + (system if loop.first else '') + message['content'] + '<|user_end|>' -}}
{%- else -%}
{{- '<|assistant_start|>' -}}
{%- if message['content'] is string -%}
{{- message['content'] -}}
{%- else -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'python' -%}
{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}
{%- elif part['type'] == 'python_output' -%}
{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}
{%- else -%}
{{- part['text'] -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|assistant_end|>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|assistant_start|>' -}}
{%- endif -%}"""


def tokenizer_config(sequence_len: int) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
            "pad_token": "<|assistant_end|>", "model_max_length": sequence_len,
            "clean_up_tokenization_spaces": False,  # decode must give back the text as encoded
            "chat_template": CHAT_TEMPLATE}


def tokenizer_from_hf(hf_dir: str) -> RustBPETokenizer:
    """Our tokenizer from a byte-level BPE tokenizer.json: ranks = ids of the vocab, the split
    regex of its Split pre-tokenizer, our special tokens right after the vocab. Its merges must
    be the ones our ranks imply (else the two would encode some text differently)."""
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise ExportError(f"{path}: missing (the directory has no fast tokenizer)")
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{path}: model type {model.get('type')!r}, expected a byte-level 'BPE'")
    pattern = _split_pattern(spec.get("pre_tokenizer"), path)
    from_text = {ch: b for b, ch in BYTE_TEXT.items()}
    try:
        tokens = {i: bytes(from_text[ch] for ch in s) for s, i in model["vocab"].items()}
    except KeyError:
        raise ExportError(f"{path}: a vocab entry is not in the byte-level alphabet (not a byte-level BPE)") from None
    if sorted(tokens) != list(range(len(tokens))):
        raise ExportError(f"{path}: vocab ids are not 0..{len(tokens) - 1}")
    _check_specials(spec.get("added_tokens") or [], len(tokens), path)
    ranks = [(tokens[i], i) for i in range(len(tokens))]
    listed = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    implied = [(token_text(a), token_text(b)) for a, b in bpe_merges(ranks)]
    if listed != implied:
        first = next((i for i, (x, y) in enumerate(zip(listed, implied)) if x != y), min(len(listed), len(implied)))
        raise ExportError(f"{path}: merge {first} is not the one the vocab's ranks imply; nanochat encodes by rank "
                          f"(tiktoken) and would split some text differently")
    try:
        ours = RustBPETokenizer.from_ranks(ranks, pattern)
    except ValueError as e:
        raise ExportError(f"{path}: the split pattern does not compile here: {e}") from None
    from tokenizers import Tokenizer
    theirs = Tokenizer.from_file(path)
    for text in PROBE_TEXTS:
        if theirs.encode(text, add_special_tokens=False).ids != ours.encode(text):
            raise ExportError(f"{path}: encodes {text!r} differently from the same ranks and pattern here (its regex "
                              f"engine, Oniguruma, reads the pattern differently)")
    return ours


def _split_pattern(pre_tokenizer, path):
    steps = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
    kinds = [s.get("type") for s in steps]
    split = next((s for s in steps if s.get("type") == "Split" and "Regex" in (s.get("pattern") or {})), None)
    if split is None or "ByteLevel" not in kinds:
        raise ExportError(f"{path}: pre_tokenizer {kinds} is not a regex Split then ByteLevel (the tiktoken-style "
                          f"byte-level BPE nanochat uses)")
    return split["pattern"]["Regex"]


def _check_specials(added, n, path):
    got = sorted((t["id"], t["content"]) for t in added)
    want = [(n + i, name) for i, name in enumerate(SPECIAL_TOKENS)]
    if got != want:
        raise ExportError(f"{path}: special tokens {got[:12]} are not nanochat's {want} "
                          f"(its chat format needs exactly these, right after the vocab)")


# -----------------------------------------------------------------------------
# The directory

def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_hf_dir(directory: str, model, tokenizer: RustBPETokenizer, dtype: str = "float32", card: str = ""):
    """Write model, tokenizer and card as a transformers NanoChat directory (into an existing,
    empty directory; scripts/export.py makes it a temp dir renamed at the end)."""
    from safetensors.torch import save_file
    config = model.config
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if config.vocab_size < tokenizer.get_vocab_size():
        raise ExportError(f"the model's vocab ({config.vocab_size}) is smaller than the tokenizer's "
                          f"({tokenizer.get_vocab_size()}): they do not belong together")
    config_json = hf_config(config, tokenizer, dtype)  # refuses MoE before anything is written
    save_file(hf_state_dict(model.state_dict(), config, DTYPES[dtype]), os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
    _write_json(os.path.join(directory, "config.json"), config_json)
    _write_json(os.path.join(directory, "generation_config.json"), generation_config(tokenizer))
    hf_tokenizer(tokenizer).save(os.path.join(directory, "tokenizer.json"))
    _write_json(os.path.join(directory, "tokenizer_config.json"), tokenizer_config(config.sequence_len))
    if card:
        with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)


def model_card(name: str, stage: str, model, source: str, command: str, metrics: list, data: str = "") -> str:
    """README.md of an export: what it is, how to load it, its size, data and metrics.
    metrics: (name, value) rows; data: a plain-text table of what the run trained on."""
    c = model.config
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [nanochat]", "---", "",
             f"# {name}", "",
             f"A [nanochat](https://github.com/karpathy/nanochat) model, stage **{stage}**, exported as a transformers "
             f"`{HF_ARCHITECTURE}` (no custom code needed).", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{name}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
             'ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,'
             ' return_tensors="pt", return_dict=True)',
             'out = model.generate(**ids, max_new_tokens=64, do_sample=False)',
             'print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))', "```", "",
             "## Model", "", "| parameters | layers | width | heads | kv heads | context | vocab |",
             "|---|---|---|---|---|---|---|",
             f"| {model.num_params():,} | {c.n_layer} | {c.n_embd} | {c.n_head} | {c.n_kv_head} | {c.sequence_len} | "
             f"{c.vocab_size:,} |", "",
             "ReLU^2 MLP, rotary embeddings, QK-norm, parameter-free RMSNorm, untied embeddings, "
             f"logits soft-capped at {c.softcap:g}. Chat format: `<|bos|><|user_start|>...<|user_end|>"
             "<|assistant_start|>...<|assistant_end|>`; generation stops at `<|assistant_end|>`.", ""]
    if data:
        lines += ["## Data", "", "```", data.strip(), "```", ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics]
        lines.append("")
    lines += ["## Provenance", "", f"From `{source}`, made with:", "", "```", command, "```", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Verification: the export, loaded by transformers, against our model

def verify_export(hf_dir: str, model, tokenizer: RustBPETokenizer, texts: list, conversation: list,
                  max_new_tokens: int = 64) -> dict:
    """Load hf_dir with transformers (fp32, CPU) and measure it against our model and tokenizer:
    the largest logit difference over `texts` (each cut to the context), how many texts encode to
    the same ids, whether the chat template renders `conversation` as render_for_completion, and
    how many greedy tokens agree with our Engine's before the first difference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanochat.engine import Engine
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    model.eval()
    diff = 0.0
    for text in texts:
        x = torch.tensor([tokenizer.encode(text, prepend="<|bos|>")[:model.config.sequence_len]])
        with torch.no_grad():
            diff = max(diff, (model(x) - hf_model(x).logits).abs().max().item())
    ids_equal = sum(hf_tok(t, add_special_tokens=False)["input_ids"] == tokenizer.encode(t) for t in texts)
    prompt = tokenizer.render_for_completion(conversation)
    rendered = hf_tok.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)["input_ids"]
    results, masks = Engine(model, tokenizer).generate_batch(prompt, max_tokens=max_new_tokens, temperature=0.0)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=max_new_tokens, do_sample=False)
    stops = set(generation_config(tokenizer)["eos_token_id"])
    theirs = []
    for token in out[0, len(prompt):].tolist():  # the Engine's results leave out the stop token
        if token in stops:
            break
        theirs.append(token)
    tool_call = 0 in masks[0]  # our Engine forced a calculator result in; transformers cannot: compare up to it
    ours = results[0][:masks[0].index(0)] if tool_call else results[0]
    theirs = theirs[:len(ours)] if tool_call else theirs
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return {"max_logit_diff": diff, "texts": len(texts), "ids_equal": ids_equal, "template_equal": rendered == prompt,
            "greedy_ours": len(ours), "greedy_theirs": len(theirs), "greedy_agree": agree,
            "greedy_equal": ours == theirs, "tool_call": tool_call}
