"""
Generation with continuous batching: one model, every active sequence decoded in the same forward.

    engine = Engine(model, tokenizer, max_batch_size=32, max_step_tokens=512)
    seqs = [Sequence(prompt_ids, max_tokens=64, temperature=0.0) for prompt_ids in prompts]
    engine.run(seqs)                          # step until they are done: seq.tokens, seq.text, ...
    engine.submit([seq]); engine.step()       # a server: submit from anywhere, one thread steps

Each step (Engine.step):
1. prefill: waiting prompts are run through the model in chunks, at most max_step_tokens tokens
   per step minus one per decoding row, so a long prompt never stalls the others for long;
2. a prompt whose prefill is complete joins the batch (its samples each take a row of the
   RowKVCache, the prompt's keys and values copied in) with its first token sampled;
3. decode: one token for every row in one forward; a row that finishes (stop token, stop string,
   max_tokens, the context, cancelled) leaves at once and the last row moves into its slot.
Per sequence: temperature, top-k, top-p, repetition penalty, seed (its own generator), stop
strings (on the decoded text), max_tokens, logprobs (the chosen token's and the top ones, from the
model's own distribution), and the tools (nanochat.tools): after <|python_start|> code
<|python_end|> the result is forced in as <|output_start|> result <|output_end|> (mask 0), cut to
max_output_tokens. tools="calc": the calculator only; "python" (default): code the calculator refuses
runs in the sandbox, on a small thread pool, with a time limit (python_timeout). Meanwhile the
sequence is parked: its keys and values are copied out of the batch, the others go on decoding,
and it rejoins with the output to feed when the call returns (a cancelled one kills its code).
A sequence's tokens do not depend on the others in the batch: greedy output is the same alone or
among 31 others (tested, fp32 on CPU).

Older single-prompt helpers run on the same machinery: generate (token columns of n samples),
stream (one sample, token by token), generate_batch, complete (a conversation's reply text).
"""
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from nanochat.kv_cache import KVCache, RowKVCache
from nanochat.reply import ReplyDecoder, first_stop, held_back
from nanochat.tools import calculator, run_python

FINISHED = -1  # a finished sample's entry in later token columns of `generate`
TOOLS = ("none", "calc", "python")  # what runs a tool call: nothing, the calculator, the calculator then python

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
    logits, ids = logits / temperature, None
    if top_k is not None and 0 < top_k < logits.size(-1):
        # sample among the k largest only: the same distribution, with k random draws instead of vocab_size
        logits, ids = torch.topk(logits, top_k, dim=-1)
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
    choice = (probs / noise).argmax(dim=-1)
    return choice if ids is None else ids.gather(-1, choice[:, None])[:, 0]


# ----------------------------------------------------------------------------- sequences
class Sequence:
    """One generation: a prompt and its settings in; tokens, text and logprobs out.

    tokens/masks: every generated token (the stop token included), mask 1 if sampled by the model,
    0 if forced by a tool; text: the reply as a user reads it (nanochat.reply), stop strings cut
    off; token_logprobs: per token but the stop token, (token, logprob, [(token, logprob), ...] the
    top `logprobs` ones) when logprobs is not None;
    finish_reason: "stop" (stop token or string), "length" (max_tokens or the context), "cancelled".
    on_event(kind, payload), if given, is called from the stepping thread: ("start", None) when it
    joins the batch, ("text", piece) as the text grows, ("done", finish_reason) once."""

    def __init__(self, prompt, max_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                 seed=42, stop=(), logprobs=None, show_thinking=True, on_event=None):
        assert isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt), \
            "Sequence: the prompt must be a non-empty list of ints"
        assert temperature >= 0.0 and repetition_penalty > 0.0 and max_tokens >= 0
        self.prompt, self.max_tokens, self.temperature = list(prompt), max_tokens, temperature
        self.top_k = top_k if top_k and top_k > 0 else None
        self.top_p = top_p if top_p is not None and top_p < 1.0 else None
        self.repetition_penalty, self.seed, self.stop = repetition_penalty, seed, list(stop)
        self.logprobs, self.show_thinking, self.on_event = logprobs, show_thinking, on_event
        self.tokens, self.masks, self.token_logprobs = [], [], []
        self.text, self.finish_reason, self.cancelled = "", None, False
        self._sent = 0               # characters of text already sent as events
        self._forced = deque()       # tool output to feed before sampling again
        self._code = None            # tokens of an open tool call
        self._call = None            # the running python call (a Future of its output text)
        self._parked = None          # the keys and values (a KVCache) while parked out of the batch
        self._stop_call = threading.Event()  # kills the running call's code
        self._rng = self._seen = self._decoder = None

    @property
    def done(self):
        return self.finish_reason is not None

    def cancel(self):
        """Stop at the next step (from any thread)."""
        self.cancelled = True

    def _emit(self, kind, payload):
        if self.on_event is not None:
            self.on_event(kind, payload)

    def _text_grew(self, piece):
        """New reply text: cut at a stop string, send what cannot be the start of one."""
        self.text += piece
        cut = first_stop(self.text, self.stop, max(0, self._sent - max((len(s) for s in self.stop), default=0)))
        if cut is not None:
            self.text = self.text[:cut]
        safe = len(self.text) if cut is not None else len(self.text) - held_back(self.text, self.stop)
        if safe > self._sent:
            self._emit("text", self.text[self._sent:safe])
            self._sent = safe
        return cut is not None

    def _finish(self, reason):
        if self.done:
            return
        if reason != "cancelled":
            if self._text_grew(self._decoder.finish()):  # what was held back: a cut character, an open call
                reason = "stop"
            if self._sent < len(self.text):  # the tail that could have begun a stop string
                self._emit("text", self.text[self._sent:])
                self._sent = len(self.text)
        self.finish_reason = reason
        self._emit("done", reason)


# ----------------------------------------------------------------------------- the engine
class _Prefill:
    """A prompt being prefilled, for the sequences (samples) that share it."""

    def __init__(self, seqs, cache):
        self.seqs, self.cache, self.done = seqs, cache, 0
        self.row = 0  # the prompt's row in cache (prompts prefilled together share one cache)

    @property
    def prompt(self):
        return self.seqs[0].prompt


class Engine:
    def __init__(self, model, tokenizer, max_batch_size=32, max_step_tokens=512, tools="python", python_timeout=5.0,
                 max_output_tokens=256, tool_workers=4):
        if tools not in TOOLS:
            raise ValueError(f"Engine: tools must be one of {TOOLS}, got {tools!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_step_tokens = max_batch_size, max_step_tokens
        self.tools, self.python_timeout, self.max_output_tokens = tools, python_timeout, max_output_tokens
        self.tool_workers, self.tool_pool = tool_workers, None  # threads for python calls, started on the first one
        sp = tokenizer.encode_special
        self.stop_ids = {sp("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        self.context = model.cos.size(1) if hasattr(model, "cos") else model.config.sequence_len  # rotary table
        c = model.config
        self.cache_dims = (c.n_layer, c.n_kv_head, c.n_embd // c.n_head)
        self.rows = []           # decoding sequences; row i of the cache is rows[i]
        self.parked = []         # sequences waiting for their python call, out of the batch (they keep their place)
        self.waiting = deque()   # _Prefill jobs not yet in the batch
        self.lock = threading.Lock()
        self.wake = threading.Event()  # a python call returned or a prompt was submitted: stop idling
        layers, heads, head_dim = self.cache_dims  # the rows' keys and values: allocated on first use
        self.row_cache = RowKVCache(layers, heads, head_dim, max_batch_size, model.get_device())

    # --------------------------------------------------------------- scheduling
    def submit(self, seqs):
        """Queue sequences that share one prompt (samples of it): prefilled once, decoded apart."""
        assert seqs and all(s.prompt == seqs[0].prompt for s in seqs), "submit: one prompt per call"
        if len(seqs) > self.max_batch_size:
            raise ValueError(f"{len(seqs)} samples of one prompt; this engine decodes at most {self.max_batch_size}")
        with self.lock:
            self.waiting.append(_Prefill(seqs, None))
        self.wake.set()

    def has_work(self):
        return bool(self.rows or self.waiting or self.parked)

    def run(self, seqs):
        """Generate every sequence to its end (prompts grouped when several share one). Returns seqs."""
        groups = {}
        for s in seqs:
            groups.setdefault(tuple(s.prompt), []).append(s)
        for group in groups.values():
            for i in range(0, len(group), self.max_batch_size):
                self.submit(group[i:i + self.max_batch_size])
        longest = max((min(self.context, len(s.prompt) + s.max_tokens + 1) for s in seqs), default=0)
        self.row_cache.expected = max(self.row_cache.expected, longest)  # one allocation, not a growth per 256
        while not all(s.done for s in seqs):
            self.step()
        return seqs

    @torch.inference_mode()
    def step(self):
        """Prefill within the step's token budget, admit finished prefills, decode one token per row.
        With only python calls in flight, wait (up to 50 ms) for one to return instead."""
        if self.parked and not self.rows and self._next_job() is None:
            self.wake.wait(0.05)
        self.wake.clear()  # before looking at the calls: one that returns later sets it again
        self._drop_cancelled()
        self._unpark()
        budget = max(1, self.max_step_tokens - len(self.rows))
        while budget > 0:
            job = self._next_job()
            if job is None:
                break
            if all(s.cancelled for s in job.seqs):
                with self.lock:
                    self.waiting.popleft()
                for s in job.seqs:
                    s._finish("cancelled")
                continue
            group = self._fresh_group(budget)
            budget -= self._prefill_group(group) if len(group) > 1 else self._prefill_chunk(job, budget)
        if self.rows:
            self._decode()

    def _fresh_group(self, budget):
        """Waiting prompts, from the front, not started and short enough to be prefilled together
        in one forward (padded to the longest: that many tokens count against the budget each),
        with room in the batch for all their samples (parked sequences keep their places)."""
        group, room = [], self.max_batch_size - len(self.rows) - len(self.parked)
        with self.lock:
            for job in self.waiting:
                longest = max([len(job.prompt)] + [len(j.prompt) for j in group])
                if job.cache is not None or len(job.seqs) > room or longest * (len(group) + 1) > budget:
                    break
                group.append(job)
                room -= len(job.seqs)
        return group

    def _prefill_group(self, group):
        """Several whole prompts in one forward (right-padded: causal attention keeps the padding
        out of every real position), then each prompt's samples join as after _prefill_chunk."""
        device = self.model.get_device()
        lengths = [len(job.prompt) for job in group]
        ids = torch.zeros(len(group), max(lengths), dtype=torch.long)
        for b, job in enumerate(group):
            ids[b, :lengths[b]] = torch.tensor(job.prompt)
        layers, heads, head_dim = self.cache_dims
        cache = KVCache(len(group), heads, max(lengths), head_dim, layers)
        logits = self.model(ids.to(device), kv_cache=cache, logits_at=torch.tensor(lengths, device=device) - 1)
        with self.lock:
            self.waiting = deque(job for job in self.waiting if all(job is not g for g in group))
        for b, job in enumerate(group):
            job.cache, job.done, job.row = cache, lengths[b], b
            self._admit(job, logits[b:b + 1, -1, :])
        return len(group) * max(lengths)

    def _next_job(self):
        """The first waiting prompt if there is room in the batch for its samples (parked sequences
        keep their places), else None."""
        with self.lock:
            job = self.waiting[0] if self.waiting else None
        if job is None or len(self.rows) + len(self.parked) + len(job.seqs) > self.max_batch_size:
            return None
        return job

    def _prefill_chunk(self, job, budget):
        """Run the next chunk of a waiting prompt; when the prompt is complete, its samples join."""
        device = self.model.get_device()
        if job.cache is None:
            layers, heads, head_dim = self.cache_dims
            job.cache = KVCache(1, heads, len(job.prompt), head_dim, layers)
        chunk = job.prompt[job.done:job.done + budget]
        last = torch.tensor([len(chunk) - 1], device=device)  # only the last position's logits are ever used
        logits = self.model(torch.tensor([chunk], dtype=torch.long, device=device), kv_cache=job.cache, logits_at=last)
        job.done += len(chunk)
        if job.done == len(job.prompt):
            with self.lock:
                self.waiting.popleft()
            self._admit(job, logits[:, -1, :])
        return len(chunk)

    def _admit(self, job, logits):
        """The prompt is in the cache: each sample takes a row and gets its first token."""
        for seq in job.seqs:
            device = self.model.get_device()
            seq._rng = torch.Generator(device=device).manual_seed(seq.seed)
            seq._decoder = ReplyDecoder(self.tokenizer, seq.show_thinking)
            if seq.repetition_penalty != 1.0:
                seq._seen = torch.zeros(logits.size(-1), dtype=torch.bool, device=device)
                seq._seen[torch.tensor(seq.prompt, device=device)] = True
            if seq.cancelled or seq.max_tokens == 0 or len(seq.prompt) >= self.context:
                seq._finish("cancelled" if seq.cancelled else "length")
                continue
            self.row_cache.load(len(self.rows), job.cache, len(job.prompt), job.row)
            self.rows.append(seq)
            seq._emit("start", None)
            self._choose([seq], logits)
        self._settle()

    def _decode(self):
        fed = torch.tensor([[s.tokens[-1]] for s in self.rows], dtype=torch.long, device=self.model.get_device())
        self.row_cache.begin_step(len(self.rows))
        logits = self.model(fed, kv_cache=self.row_cache)[:, -1, :]
        self._choose(self.rows, logits)
        self._settle()

    def _settle(self):
        """After a token per row: finished rows leave; rows whose python call started are parked
        (their keys and values copied out first, since leaving moves other rows over them)."""
        self._leave([i for i, s in enumerate(self.rows) if s.done])
        calling = [i for i, s in enumerate(self.rows) if s._call is not None]
        for i in calling:
            self.rows[i]._parked = self.row_cache.save(i)
            self.parked.append(self.rows[i])
        self._leave(calling)

    def _unpark(self):
        """Parked sequences whose call returned rejoin the batch (there is room: admission counts
        them), its output queued to be fed next."""
        for s in [s for s in self.parked if s._call.done()]:
            self.parked.remove(s)
            self._force(s, s._call.result())
            s._call = None
            self.row_cache.load(len(self.rows), s._parked)
            s._parked = None
            self.rows.append(s)

    def discard(self, seqs):
        """Take sequences out of the queue and the batch at once (their finish_reason: cancelled)."""
        targets = {id(s) for s in seqs if not s.done}
        if not targets:
            return
        with self.lock:
            self.waiting = deque(job for job in self.waiting if not any(id(s) in targets for s in job.seqs))
        for s in seqs:
            if not s.done:
                s.cancel()
                s._finish("cancelled")
        self._unpark_cancelled()
        self._leave([i for i, s in enumerate(self.rows) if id(s) in targets])

    def _drop_cancelled(self):
        """Sequences cancelled from another thread: out of the queue and the batch."""
        with self.lock:
            gone = [job for job in self.waiting if all(s.cancelled for s in job.seqs)]
            self.waiting = deque(job for job in self.waiting if job not in gone)
        for job in gone:
            for s in job.seqs:
                s._finish("cancelled")
        for s in self.rows:
            if s.cancelled:
                s._finish("cancelled")
        self._unpark_cancelled()
        self._leave([i for i, s in enumerate(self.rows) if s.done])

    def _unpark_cancelled(self):
        """Cancelled parked sequences: their code is killed, their place freed."""
        for s in [s for s in self.parked if s.cancelled]:
            s._stop_call.set()
            s._finish("cancelled")
            self.parked.remove(s)
            s._call = s._parked = None

    def _leave(self, finished):
        """Free the rows of finished sequences; the last rows move into the holes (a prefix stays)."""
        for i in sorted(finished, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                self.row_cache.move(last, i)
                self.rows[i] = self.rows[last]
            self.rows.pop()

    # --------------------------------------------------------------- one token per sequence
    def _choose(self, seqs, logits):
        """Pick each sequence's next token from its row of logits (or its forced tool output)."""
        greedy = [i for i, s in enumerate(seqs) if s.temperature == 0.0 and s._seen is None]
        picked = {}
        if greedy:
            picked.update(zip(greedy, logits[greedy].argmax(dim=-1).tolist()))
        for i, s in enumerate(seqs):
            if i not in picked:
                row = logits[i:i + 1]
                if s._seen is not None:
                    row = apply_repetition_penalty(row, s._seen, s.repetition_penalty)
                picked[i] = int(sample_next_token(row, s._rng, s.temperature, s.top_k, s.top_p)[0])
        want = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        logp = F.log_softmax(logits[want].float(), dim=-1) if want else None
        for j, i in enumerate(want):
            seqs[i]._logp_row = logp[j]
        for i, s in enumerate(seqs):
            self._append(s, *(s._forced.popleft(), 0) if s._forced else (picked[i], 1))

    def _append(self, s, token, mask):
        s.tokens.append(token)
        s.masks.append(mask)
        if s._seen is not None:
            s._seen[token] = True
        if s.logprobs is not None and token not in self.stop_ids:  # the stop token is no text: no entry
            row = s._logp_row
            top = torch.topk(row, s.logprobs) if s.logprobs > 0 else None
            s.token_logprobs.append((token, float(row[token]),
                                     list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []))
        if token in self.stop_ids and mask == 1:
            return s._finish("stop")
        code = self._collect(s, token)
        if s._text_grew(s._decoder.add(token)):
            return s._finish("stop")  # a stop string
        if len(s.tokens) >= s.max_tokens or len(s.prompt) + len(s.tokens) >= self.context:
            return s._finish("length")
        if code is not None:
            self._run_tool(s, code)

    def _collect(self, s, token):
        """A tool call's tokens are collected; at its end, its code is returned."""
        if token == self.python_start:
            s._code = []
        elif token == self.python_end and s._code is not None:
            code, s._code = self.tokenizer.decode(s._code), None
            return code
        elif s._code is not None:
            s._code.append(token)
        return None

    def _run_tool(self, s, code):
        """The calculator's result is queued at once; code it refuses goes to the sandbox in the
        background (the sequence is parked by _settle until it returns). Nothing runs: nothing is fed."""
        result = calculator(code) if self.tools != "none" else None
        if result is not None:
            self._force(s, result)
        elif self.tools == "python":
            if self.tool_pool is None:
                self.tool_pool = ThreadPoolExecutor(self.tool_workers, thread_name_prefix="nanochat-python")
            s._call = self.tool_pool.submit(run_python, code, self.python_timeout, s._stop_call)
            s._call.add_done_callback(lambda _: self.wake.set())

    def _force(self, s, result):
        """Queue <|output_start|> result <|output_end|>, the result cut to max_output_tokens (and saying so)."""
        ids = self.tokenizer.encode(result)
        if len(ids) > self.max_output_tokens:
            kept = self.tokenizer.decode(ids[:self.max_output_tokens]).rstrip("\ufffd")  # no half character
            ids = self.tokenizer.encode(f"{kept}\n[output cut at {self.max_output_tokens} tokens]")
        s._forced.extend([self.output_start, *ids, self.output_end])

    # --------------------------------------------------------------- one prompt, n samples
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None,
                 repetition_penalty=1.0, seed=42):
        """Yield (token_column, token_masks) per step for num_samples samples of one prompt: the
        stop token is yielded (mask 1), later entries of a finished sample are FINISHED (mask 0).
        Sample i uses seed + i. max_tokens None: up to the model's sequence_len in total."""
        if max_tokens is None:
            max_tokens = max(0, self.model.config.sequence_len - len(tokens))
        seqs = [Sequence(tokens, max_tokens, temperature, top_k, top_p, repetition_penalty, seed + i)
                for i in range(num_samples)]
        self.submit(seqs)
        yielded = 0
        try:
            while True:
                # a column once every sample has its token or is done (one parked for a python call lags)
                while any(len(s.tokens) > yielded for s in seqs) and all(len(s.tokens) > yielded or s.done for s in seqs):
                    column = [s.tokens[yielded] if len(s.tokens) > yielded else FINISHED for s in seqs]
                    yield column, [s.masks[yielded] if len(s.tokens) > yielded else 0 for s in seqs]
                    yielded += 1
                if all(s.done for s in seqs):
                    return
                self.step()
        finally:  # closed early (a consumer stopped reading, Ctrl-C): take these samples out
            self.discard(seqs)

    def stream(self, tokens, **kwargs):
        """One sample, token by token: (token, mask); ends after the stop token."""
        for column, masks in self.generate(tokens, num_samples=1, **kwargs):
            yield column[0], masks[0]

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Run `generate` to the end -> (results, masks): per sample the generated ids (without the
        stop token) and their masks."""
        results, masks = [[] for _ in range(num_samples)], [[] for _ in range(num_samples)]
        for column, column_masks in self.generate(tokens, num_samples=num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if token != FINISHED and token not in self.stop_ids:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks

    def complete_many(self, conversations, max_tokens, temperature=0.0, top_k=None, seed=42):
        """The reply texts (tool calls and output included, as the tokenizer decodes them) to many
        conversations' prompts, generated together; greedy by default."""
        seqs = []
        for i, conversation in enumerate(conversations):
            prompt = self.tokenizer.render_for_completion(conversation)
            seqs.append(Sequence(prompt, max(0, min(max_tokens, self.context - len(prompt))), temperature, top_k,
                                 seed=seed + i))
        self.run(seqs)
        return [self.tokenizer.decode([t for t in s.tokens if t not in self.stop_ids]) for s in seqs]

    def complete(self, conversation, max_tokens, temperature=0.0, top_k=None, seed=42):
        return self.complete_many([conversation], max_tokens, temperature, top_k, seed)[0]
