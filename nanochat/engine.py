"""Batched generation with a KV cache, sampling and tool use (the calculator).

    engine = Engine(model, tokenizer)
    for token_column, token_masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64):
        ...  # one token per sample per step
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

The prompt is prefilled once with batch 1; its cache is copied to num_samples rows and
every step decodes one token for all rows. Streaming: with num_samples=1, `generate` (or
`stream`: (token, mask) pairs; `stream_text`: text pieces) yields each token as soon as it
is chosen, so a CLI or web server prints as it goes.

Conventions of `generate` (the contract other modules rely on):
- each step yields (token_column, token_masks): one id and one mask per sample; mask 1 =
  sampled by the model, 0 = forced by the engine (tool output).
- a sample stops at <|assistant_end|> or <|bos|>: that stop token IS yielded (mask 1), once.
  In later columns a finished sample's entry is FINISHED (-1) with mask 0; internally the row
  keeps being fed its stop token (the batch stays rectangular) and its logits are ignored.
- the generator returns when every sample has finished or after max_tokens steps (forced
  tokens count as steps). max_tokens=None: up to the model's sequence_len in total.
- the same seed, prompt and settings give the same tokens (a torch.Generator per call).

Tool use, per sample: after <|python_start|> the tokens up to <|python_end|> are decoded and
passed to `calculator`; if it returns a result, <|output_start|> result <|output_end|> is
forced into that sample's stream (mask 0) before the model samples again. A refused
expression forces nothing: the model carries on as it likes.
"""
import ast
import math
import operator
from collections import deque

import torch
import torch.nn.functional as F

from nanochat.gpt import KVCache

FINISHED = -1  # a finished sample's entry in later token columns

# ----------------------------------------------------------------------------- calculator
MAX_EXPR_CHARS = 1000
MAX_INT_BITS = 4096  # about 1233 decimal digits: bounds every intermediate integer
MAX_STR_CHARS = 10_000
STRING_METHODS = {"count", "upper", "lower", "strip", "replace", "split", "find"}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARYOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Refused(Exception):
    pass


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _checked(x):
    """Refuse values that are too big or not plain results (inf/nan, complex, huge strings)."""
    if isinstance(x, bool):
        return x
    if isinstance(x, int):
        if x.bit_length() > MAX_INT_BITS:
            raise _Refused("integer too large")
    elif isinstance(x, float):
        if not math.isfinite(x):
            raise _Refused("not finite")
    elif isinstance(x, str):
        if len(x) > MAX_STR_CHARS:
            raise _Refused("string too long")
    elif isinstance(x, list):
        if sum(len(s) for s in x) > MAX_STR_CHARS or not all(isinstance(s, str) for s in x):
            raise _Refused("list too long")
    else:
        raise _Refused(f"{type(x).__name__} result")
    return x


def _eval(node):
    """Evaluate a whitelisted AST node. Anything not handled here is refused."""
    if isinstance(node, ast.Constant):
        if _is_number(node.value) or isinstance(node.value, str):
            return _checked(node.value)
        raise _Refused("constant")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARYOPS:
        x = _eval(node.operand)
        if not _is_number(x):
            raise _Refused("unary op on a non-number")
        return _checked(_UNARYOPS[type(node.op)](x))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Add) and isinstance(a, str) and isinstance(b, str):
            return _checked(a + b)
        if not (_is_number(a) and _is_number(b)):
            raise _Refused("arithmetic on a non-number")  # also rules out "%" formatting and str * int
        if isinstance(node.op, ast.Pow):
            # decide before computing: 9**9**9 would take forever
            if abs(b) > MAX_INT_BITS:
                raise _Refused("exponent too large")
            if isinstance(a, int) and isinstance(b, int) and b > 0 and a.bit_length() * b > MAX_INT_BITS:
                raise _Refused("power too large")
        return _checked(_BINOPS[type(node.op)](a, b))
    if isinstance(node, ast.Call) and not node.keywords:
        args = [_eval(a) for a in node.args]
        if isinstance(node.func, ast.Name) and node.func.id == "len" and len(args) == 1:
            if not isinstance(args[0], (str, list)):
                raise _Refused("len of a non-string")
            return len(args[0])
        if isinstance(node.func, ast.Attribute) and node.func.attr in STRING_METHODS:
            obj = _eval(node.func.value)
            if not isinstance(obj, str) or not all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in args):
                raise _Refused("string method on a non-string")
            return _checked(getattr(obj, node.func.attr)(*args))
    raise _Refused(type(node).__name__)


def _format(x):
    if isinstance(x, float):
        # integral floats print as integers (84/2 -> "42"); others with 12 significant digits
        return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:.12g}"
    return x if isinstance(x, str) else str(x)


def calculator(expr: str) -> str | None:
    """Evaluate a tool call: arithmetic (+ - * / // % **, unary +/-, parentheses on int/float
    literals), string literals joined with +, the methods .count .upper .lower .strip .replace
    .split .find on strings and len(string). Nothing else: no names, other attributes or calls,
    subscripts, comprehensions, lambdas. Every intermediate value is bounded (ints up to
    MAX_INT_BITS bits, exponents checked before computing, finite floats, strings up to
    MAX_STR_CHARS). Returns the result as text (strings unquoted, integral floats as ints), or
    None if the expression is refused or fails (syntax error, division by zero, ...)."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        return _format(_eval(tree.body))
    except (_Refused, SyntaxError, ValueError, TypeError, ArithmeticError, MemoryError, RecursionError):
        return None


# ----------------------------------------------------------------------------- sampling
def apply_repetition_penalty(logits, seen, penalty):
    """CTRL-style: for tokens already in the context (seen: bool, same shape as logits),
    positive logits are divided by penalty and negative ones multiplied, so penalty > 1
    always makes them less likely."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> ids (B,). temperature 0 = greedy (top_k/top_p then do not matter).
    top_k keeps the k largest logits (None or 0: all); top_p keeps the smallest set of most
    likely tokens whose probability reaches top_p (None or 1: all; always at least one)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    # exponential race (argmax of p / Exp(1) noise): an exact sample of probs, much faster
    # than torch.multinomial on CPU, and reproducible with the generator
    noise = torch.empty_like(probs).exponential_(1.0, generator=rng)
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # a 0 draw would give 0/0 = nan for masked tokens
    return (probs / noise).argmax(dim=-1)


# ----------------------------------------------------------------------------- engine
class _Row:
    """Per-sample state: finished?, inside a python block?, tokens to force next."""

    def __init__(self):
        self.done = False
        self.python = None  # list of expression tokens while inside <|python_start|> ... <|python_end|>
        self.forced = deque()
        self.last = None  # the last token fed (a finished row keeps being fed it)


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        sp = tokenizer.encode_special
        self.stop_ids = {sp("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")

    def _new_cache(self, batch_size, seq_len):
        c = self.model.config
        return KVCache(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer)

    def _advance(self, row, token):
        """Update a row's state after `token` joined its stream."""
        if token in self.stop_ids:
            row.done = True
        elif token == self.python_start:
            row.python = []
        elif token == self.python_end and row.python is not None:
            result = calculator(self.tokenizer.decode(row.python))
            row.python = None
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.python is not None:
            row.python.append(token)

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None,
                 repetition_penalty=1.0, seed=42):
        """Yield (token_column, token_masks) per step; see the module docstring."""
        assert isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens), \
            "generate: tokens must be a non-empty list of ints"
        assert num_samples >= 1, f"generate: num_samples must be >= 1, got {num_samples}"
        assert temperature >= 0.0, f"generate: temperature must be >= 0, got {temperature}"
        assert repetition_penalty > 0.0, f"generate: repetition_penalty must be > 0, got {repetition_penalty}"
        if max_tokens is None:
            max_tokens = max(0, self.model.config.sequence_len - len(tokens))
        device = self.model.get_device()
        rng = torch.Generator(device=device).manual_seed(seed)

        # prefill the prompt once, then share its cache across the samples
        prefill_cache = self._new_cache(1, len(tokens))
        logits = self.model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=prefill_cache)
        logits = logits[:, -1, :].expand(num_samples, -1)
        kv_cache = self._new_cache(num_samples, len(tokens) + max_tokens)
        kv_cache.prefill(prefill_cache)
        del prefill_cache

        rows = [_Row() for _ in range(num_samples)]
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros(num_samples, logits.size(-1), dtype=torch.bool, device=device)
            seen[:, torch.tensor(tokens, device=device)] = True
        for step in range(max_tokens):
            if step > 0:
                fed = torch.tensor([[row.last] for row in rows], dtype=torch.long, device=device)
                logits = self.model(fed, kv_cache=kv_cache)[:, -1, :]
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p).tolist()
            column, masks = [], []
            for row, token in zip(rows, sampled):
                if row.done:
                    column.append(FINISHED)
                    masks.append(0)
                    continue
                if row.forced:
                    token, mask = row.forced.popleft(), 0
                else:
                    mask = 1
                row.last = token
                column.append(token)
                masks.append(mask)
                self._advance(row, token)
            if seen is not None:
                seen[torch.arange(num_samples, device=device), torch.tensor([r.last for r in rows], device=device)] = True
            yield column, masks
            if all(row.done for row in rows):
                return

    def stream(self, tokens, **kwargs):
        """One sample, token by token: yields (token, mask); ends after the stop token."""
        for column, masks in self.generate(tokens, num_samples=1, **kwargs):
            yield column[0], masks[0]

    def stream_text(self, tokens, **kwargs):
        """One sample as text pieces, for printing as it goes (the stop token is not shown).
        A character split across tokens is held back until its last byte arrives (at most
        4 tokens, so invalid bytes still come out, as U+FFFD)."""
        pending = []
        for token, _ in self.stream(tokens, **kwargs):
            if token in self.stop_ids:
                break
            pending.append(token)
            text = self.tokenizer.decode(pending)
            if not text.endswith("\ufffd") or len(pending) >= 4:
                yield text
                pending = []
        if pending:
            yield self.tokenizer.decode(pending)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Run `generate` to the end -> (results, masks): per sample the generated ids (without
        the prompt and without the stop token) and their masks."""
        results = [[] for _ in range(num_samples)]
        masks = [[] for _ in range(num_samples)]
        for column, column_masks in self.generate(tokens, num_samples=num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if token != FINISHED and token not in self.stop_ids:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks

    def complete(self, conversation, max_tokens, temperature=0.0, top_k=None, seed=42):
        """The reply text (tool calls and their output included) to a conversation's prompt; greedy
        by default. Prompt + reply never outgrow the model's rotary table."""
        prompt = self.tokenizer.render_for_completion(conversation)
        room = self.model.cos.size(1) - len(prompt)
        if room <= 0:
            return ""
        results, _ = self.generate_batch(prompt, num_samples=1, max_tokens=min(max_tokens, room),
                                         temperature=temperature, top_k=top_k, seed=seed)
        return self.tokenizer.decode(results[0])
