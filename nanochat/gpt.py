"""The GPT: a decoder-only Transformer with one forward for training, eval and KV-cached decoding.

Choices (each a known improvement over GPT-2, kept because it is cheap and simple):
- rotary position embeddings (no learned positions), QK-norm, parameter-free RMSNorm
- ReLU^2 MLP, no biases, untied token embedding and lm_head
- optionally a mixture-of-experts MLP (n_experts > 0): a top-k router with the Switch
  load-balancing loss, experts as stacked weights run by batched matmuls (see MoE)
- grouped-query attention (n_kv_head <= n_head), SDPA attention (flash kernels on GPU)
- logit soft-capping: softcap * tanh(logits / softcap), computed in fp32; on CPU the
  training loss is computed in chunks without materializing the logits (see
  ChunkedSoftcapCrossEntropy), elsewhere plainly (torch.compile fuses it)

Make a model with one dial, `depth`, then materialize it:
    config = config_from_depth(depth, vocab_size, sequence_len)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
On CUDA the embedding is stored in bf16 and the forward is meant to run under
torch.autocast(dtype=torch.bfloat16) (it also runs without, in fp32 after the lookup);
on CPU everything is fp32.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.adamw import AdamW, DistAdamW
from nanochat.common import is_distributed
from nanochat.kv_cache import KVCache
from nanochat.muon import DistMuon, Muon


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    softcap: float = 15.0
    # New fields get defaults that mean "as before", so a checkpoint's saved config keeps
    # loading with GPTConfig(**saved). Mixture of experts (MoE, the MLP only):
    n_experts: int = 0                # routed experts per MoE layer; 0 = the dense MLP everywhere
    experts_per_token: int = 2        # top-k: experts each token is sent to
    expert_hidden: int = 0            # hidden width of each expert (and the shared one); 0 = 4 * n_embd
    shared_expert: bool = False       # an always-on expert beside the routed ones (DeepSeekMoE)
    moe_aux_loss_coef: float = 0.01   # weight of the load-balancing loss in the training loss
    moe_every: int = 1                # MoE in every moe_every-th block (1: all, 2: every other), dense elsewhere
    moe_capacity_factor: float = 0.0  # training only: bucket size = factor * k * tokens / experts, overflow
                                      # dropped (static shapes, for torch.compile); 0 = no token is dropped

    def __post_init__(self):
        assert self.n_embd % self.n_head == 0, f"GPTConfig: n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
        assert self.n_head % self.n_kv_head == 0, f"GPTConfig: n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}"
        assert (self.n_embd // self.n_head) % 2 == 0, f"GPTConfig: head_dim={self.n_embd // self.n_head} must be even (rotary pairs)"
        assert self.n_experts >= 0, f"GPTConfig: n_experts={self.n_experts} must be >= 0 (0 = dense)"
        if self.n_experts:
            assert 1 <= self.experts_per_token <= self.n_experts, \
                f"GPTConfig: experts_per_token={self.experts_per_token} must be in 1..n_experts={self.n_experts}"
            assert self.moe_every >= 1, f"GPTConfig: moe_every={self.moe_every} must be >= 1"
            assert self.expert_hidden >= 0 and self.moe_capacity_factor >= 0, \
                "GPTConfig: expert_hidden and moe_capacity_factor must be >= 0"

    def is_moe_layer(self, layer_idx):
        return self.n_experts > 0 and (layer_idx + 1) % self.moe_every == 0


def config_from_depth(depth, vocab_size, sequence_len, head_dim=128, n_kv_head=None, aspect_ratio=64, softcap=15.0,
                      **moe):
    """The one-dial model: width = aspect_ratio * depth, heads of about head_dim channels.
    n_head is the smallest count that keeps heads no wider than head_dim, divides the width
    and leaves an even head size; tiny models therefore get one narrow head (depth 1: 64).
    moe: GPTConfig's MoE fields (n_experts=..., experts_per_token=..., ...), passed through."""
    assert depth >= 1, f"depth must be >= 1, got {depth}"
    n_embd = aspect_ratio * depth
    n_head = max(1, math.ceil(n_embd / head_dim))
    while n_embd % n_head or (n_embd // n_head) % 2:
        n_head += 1
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, softcap=softcap, **moe)


def norm(x):
    # parameter-free RMSNorm: nothing to learn, nothing to decay, and it is one fused kernel
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    """Rotate channel pairs (i, i + D/2) of x (B, T, H, D) by position-dependent angles:
    (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin). The tables are full width, cos = [c, c],
    sin = [s, -s], so this is x * cos + swap_halves(x) * sin: 3 kernels, not 7."""
    d = x.shape[-1] // 2
    swapped = torch.cat([x[..., d:], x[..., :d]], dim=-1)
    return torch.addcmul(x * cos, swapped, sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm: bounded attention logits, stable at high lr
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        mask = None
        if kv_cache is not None:
            mask = kv_cache.attn_mask
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        if self.n_kv_head != self.n_head:
            # GQA: each kv head serves n_head/n_kv_head query heads. An explicit repeat
            # rather than SDPA's enable_gqa, which needs torch >= 2.5.
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is not None:
            # rows of different lengths decoded together: each attends to its own tokens
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif Tq == Tk:
            # training, or prefill of an empty cache: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif Tq == 1:
            # one new token: it may see every cached token
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            # several new tokens after a cache: all of the prefix, causal among themselves
            # (is_causal would align the triangle to the top-left, which is wrong here)
            prefix = Tk - Tq
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    """The dense feed-forward block. Its own module so a MoE layer (same input and output
    shapes) can take its place in Block, chosen from the config."""

    def __init__(self, config, hidden=None):
        super().__init__()
        hidden = hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2: sparse and cheap


# How MoE runs its experts: "bmm" (padded buckets, batched matmuls), "loop" (a loop over the
# experts, no padding) or "auto": loop on CPU in eager mode, bmm elsewhere and under torch.compile
# (see MoE). Outputs agree to rounding.
MOE_DISPATCH = "auto"


class MoE(nn.Module):
    """Mixture of experts in place of the MLP: a linear router scores n_experts ReLU^2 MLPs per
    token, each token goes to its top-k, and their outputs are summed with the router's weights
    (renormalized over the k chosen when k > 1; for k = 1 the raw probability, as in Switch,
    since a renormalized single weight is always 1 and the router would learn nothing from the
    language-model loss). An optional shared expert sees every token.

    The experts are stacked weights, w_fc (E, hidden, d) and w_proj (E, d, hidden), laid out like
    nn.Linear weights (out, in) so that Muon treats each expert as it treats the dense MLP. No
    Python loop over tokens: the (token, expert) assignments are sorted by expert, so each
    expert's inputs are one contiguous slice, run through the expert's two matmuls, and added
    back to their tokens with index_add. How the experts run (MOE_DISPATCH):
    - "bmm": every expert at once, each slice copied into a zero-padded bucket (E, C, d) and two
      batched matmuls (torch.bmm) over the experts; C is the busiest expert's load, so an
      unbalanced router pays for padding (up to E times the work when all go to one expert).
    - "loop": a loop over the E experts (not the tokens), two plain matmuls per slice; no
      padding, so it does exactly the dense work per token; the faster one on CPU.
    With a capacity factor (training only), buckets have a fixed size computed from the token
    count and overflow assignments are dropped (those tokens keep the residual and the shared
    expert): static shapes, for torch.compile.

    Each forward stores the Switch load-balancing loss in self.aux_loss:
    n_experts * sum_e f_e * P_e, with f_e the fraction of assignments that went to expert e and
    P_e the mean router probability of e. It is 1 when the load and the router are uniform and
    grows to n_experts as everything collapses onto one expert; its gradient flows through P."""

    def __init__(self, config):
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.experts_per_token
        self.capacity_factor = config.moe_capacity_factor
        d, hidden = config.n_embd, config.expert_hidden or 4 * config.n_embd
        self.router = nn.Linear(d, self.n_experts, bias=False)
        self.w_fc = nn.Parameter(torch.empty(self.n_experts, hidden, d))
        self.w_proj = nn.Parameter(torch.empty(self.n_experts, d, hidden))
        self.shared = MLP(config, hidden) if config.shared_expert else None
        self.aux_loss = self.load = None  # of the last forward

    @torch.no_grad()
    def init_weights(self):
        d = self.w_fc.size(-1)
        # router logits start ~N(0, 1) on the normed input: tokens spread over the experts
        for w in (self.router.weight, self.w_fc) + ((self.shared.c_fc.weight,) if self.shared is not None else ()):
            nn.init.normal_(w, mean=0.0, std=d ** -0.5)
        nn.init.zeros_(self.w_proj)  # as the dense MLP: the block starts as the identity
        if self.shared is not None:
            nn.init.zeros_(self.shared.c_proj.weight)

    def route(self, x):
        """x (N, d) -> expert ids (N, k), their weights (N, k) and all router probabilities (N, E)."""
        probs = self.router(x).float().softmax(dim=-1)  # fp32: the aux loss and the weights are small sums
        top_p, top_e = probs.topk(self.top_k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True) if self.top_k > 1 else top_p
        return top_e, gates, probs

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        (N, d), E, k = x.shape, self.n_experts, self.top_k
        top_e, gates, probs = self.route(x)
        expert = top_e.flatten()  # assignment a = (token a // k, its (a % k)-th choice)
        # tokens per expert (scatter_add rather than bincount: a static shape for torch.compile);
        # kept for logging, e.g. the benchmark's padding figure
        self.load = load = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, expert, torch.ones_like(expert))
        self.aux_loss = E * (load.float() / (N * k) * probs.mean(dim=0)).sum()
        # sort the assignments by expert: each expert's inputs become one contiguous slice
        order = expert.argsort(stable=True)
        expert, token, weight = expert[order], order // k, gates.flatten()[order]
        slot = torch.arange(N * k, device=x.device) - (load.cumsum(0) - load)[expert]  # position in the slice
        capacity = None
        if self.training and self.capacity_factor > 0:
            capacity = max(1, math.ceil(self.capacity_factor * N * k / E))
            weight = weight * (slot < capacity)  # overflow assignments are dropped
        rows = x[token]
        # the loop's slice sizes are data (a host sync and a graph break): compiled code takes the buckets
        loop_ok = x.device.type == "cpu" and not torch.compiler.is_compiling()
        dispatch = MOE_DISPATCH if MOE_DISPATCH != "auto" else ("loop" if loop_ok else "bmm")
        if dispatch == "loop":
            out = self._experts_loop(rows, load)
        else:
            out = self._experts_bmm(rows, expert, slot, load, capacity)
        # each assignment's output times its router weight, added to its token
        contrib = out * weight[:, None].to(out.dtype)
        y = contrib.new_zeros(N, d).index_add_(0, token, contrib)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(shape)

    def _experts_loop(self, rows, load):
        # unbind, not w[e]: its backward stacks the E gradients once instead of E full-size adds
        slices = rows.split(load.tolist())  # one host sync
        outs = [torch.mm(F.relu(torch.mm(xe, w_fc.t())).square(), w_proj.t())
                for xe, w_fc, w_proj in zip(slices, self.w_fc.unbind(0), self.w_proj.unbind(0))]
        return torch.cat(outs)

    def _experts_bmm(self, rows, expert, slot, load, capacity):
        C = capacity or int(load.max())  # without a capacity: one host sync; nothing dropped
        slot = slot.clamp(max=C)  # overflow (weight 0) goes to a spare row C that is never computed
        buckets = rows.new_zeros(self.n_experts, C + 1, rows.size(1))
        buckets[expert, slot] = rows
        h = F.relu(torch.bmm(buckets[:, :C], self.w_fc.mT)).square()
        out = torch.bmm(h, self.w_proj.mT)  # (E, C, d)
        return out[expert, slot.clamp(max=C - 1)]


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config)

    def forward(self, x, cos_sin, kv_cache):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


# Logits per chunk in the CPU loss: 2^22 fp32 values = 16 MB, near cache size; fewer, larger
# chunks also mean fewer thread-pool barriers, which hurt when the cores are oversubscribed.
# 0 turns the chunked loss off (plain path everywhere), e.g. to compare the two.
LOSS_CHUNK_ELEMENTS = 2 ** 22


class ChunkedSoftcapCrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits = softcap * tanh(x @ W^T), made chunk by chunk of tokens and
    never held whole; used on CPU. Plain PyTorch writes and re-reads about six vocab-sized
    tensors per step (logits, capped logits, log-probs and their gradients), and on CPU each
    fresh one also pays page faults: together more than the lm_head matmuls. Here each chunk's
    logits stay in cache, and the forward keeps only d(loss)/d(x W^T) (softmax minus one-hot,
    times the tanh derivative) for backward, which is then two matmuls.
    x: (N, C) fp32, already divided by softcap; targets: (N,), -1 = ignored. The reduction's
    per-token weights are applied to the small tensors in backward, never to the big one."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, reduction, needs_grad):
        N, V = x.size(0), weight.size(0)
        losses = torch.zeros(N, dtype=torch.float32, device=x.device)
        dz = torch.empty(N, V, dtype=torch.float32, device=x.device) if needs_grad else None
        rows = max(1, LOSS_CHUNK_ELEMENTS // V)
        buf = torch.empty(min(rows, N), V, dtype=torch.float32, device=x.device)  # reused by every chunk
        for s in range(0, N, rows):
            e = min(N, s + rows)
            # t = tanh(z), computed where this chunk's gradient will go (no copy at the end)
            t = torch.mm(x[s:e], weight.t(), out=dz[s:e]) if needs_grad else torch.mm(x[s:e], weight.t())
            t.tanh_()
            # |logits| < softcap, so exp cannot overflow: no max-subtraction pass needed
            expl = torch.mul(t, softcap, out=buf[:e - s]).exp_()
            sumexp = expl.sum(dim=-1)
            valid = targets[s:e] >= 0
            y = targets[s:e].clamp(min=0)
            picked = t.gather(1, y[:, None]).squeeze(1) * softcap
            losses[s:e] = torch.where(valid, sumexp.log() - picked, 0.0)
            if needs_grad:
                probs = expl.div_(sumexp[:, None])  # softmax
                probs[torch.arange(e - s, device=x.device), y] -= 1.0
                probs.mul_(valid[:, None] * softcap)  # ignored rows get no gradient
                t.square_().neg_().add_(1.0).mul_(probs)  # d logits / dz = softcap * (1 - t^2)
        n_valid = (targets >= 0).sum()
        ctx.reduction = reduction
        ctx.save_for_backward(x, weight, dz, n_valid)
        if reduction == "none":
            return losses
        return losses.sum() / n_valid if reduction == "mean" else losses.sum()

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, dz = ctx.saved_tensors[:3]
        n_valid = ctx.saved_tensors[3]
        if ctx.reduction == "none":  # a weight per token: scale the rows of the small operands
            r = grad_out[:, None]
            grad_x, grad_w = (dz @ weight) * r, dz.t() @ (x * r)
        else:
            scale = grad_out / n_valid if ctx.reduction == "mean" else grad_out
            grad_x, grad_w = (dz @ weight) * scale, (dz.t() @ x) * scale
        return grad_x, grad_w, None, None, None, None


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.moe_aux_loss = None  # the last forward's load-balancing loss (MoE models), for logging
        # Rotary tables 10x the training length, so generation can run past it. Buffers that
        # are not saved: init_weights recomputes them on the real device.
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary(self.rotary_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _precompute_rotary(self, seq_len, base=10000, device=None):
        head_dim = self.config.n_embd // self.config.n_head
        channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)  # see apply_rotary_emb
        if cos.device.type == "cuda":
            cos, sin = cos.bfloat16(), sin.bfloat16()
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D), broadcasts over B, H

    @torch.no_grad()
    def init_weights(self):
        """Initialize every parameter in place (after to_empty). Uses the global torch RNG, so
        the same seed gives the same weights."""
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        # small lm_head: logits start near 0, so the initial loss is ~ln(vocab_size)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            dense = isinstance(block.mlp, MLP)
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v) + ((block.mlp.c_fc,) if dense else ()):
                nn.init.normal_(lin.weight, mean=0.0, std=lin.in_features ** -0.5)
            # zero output projections: every block starts as the identity on the residual stream
            nn.init.zeros_(block.attn.c_proj.weight)
            if dense:
                nn.init.zeros_(block.mlp.c_proj.weight)
            else:
                block.mlp.init_weights()
        device = self.transformer.wte.weight.device
        self.cos, self.sin = self._precompute_rotary(self.rotary_seq_len, device=device)
        if device.type == "cuda":
            # bf16 embedding on GPU: half the memory of the biggest table; its output feeds
            # bf16 autocast regions anyway
            self.transformer.wte.to(dtype=torch.bfloat16)

    def get_device(self):
        return self.transformer.wte.weight.device

    def moe_layers(self):
        return [block.mlp for block in self.transformer.h if isinstance(block.mlp, MoE)]

    def num_params(self, exclude_embedding=False):
        """All parameters (for a MoE model: every expert; see num_active_params)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wte.weight.numel() if exclude_embedding else n

    def num_active_params(self, exclude_embedding=False):
        """Parameters one token uses: num_params less the experts it is not routed to
        (n_experts - experts_per_token per MoE layer). The same as num_params when dense."""
        n = self.num_params(exclude_embedding)
        for moe in self.moe_layers():
            n -= (moe.n_experts - moe.top_k) * (moe.w_fc[0].numel() + moe.w_proj[0].numel())
        return n

    def estimate_flops(self):
        """Training FLOPs per token: 6 per matmul weight a token uses (forward + backward; for
        MoE the active parameters, router included), plus attention scores and weighted sum,
        12 * layers * heads * head_dim * seq_len. The embedding is a lookup, not a matmul, so it
        is left out; lm_head is a matmul and counts. MoE dispatch (sort, copies) is not counted."""
        c = self.config
        l, h, q, t = c.n_layer, c.n_head, c.n_embd // c.n_head, c.sequence_len
        return 6 * self.num_active_params(exclude_embedding=True) + 12 * l * h * q * t

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, adam_betas=(0.8, 0.95)):
        """[AdamW for wte, lm_head, MoE routers and any non-matrix params; Muon for the blocks'
        matrices, MoE experts included: a stack (E, out, in) is orthogonalized expert by expert].
        The distributed (sharded, no DDP wrapper needed) variants when world size > 1.
        weight_decay (decoupled, times lr) applies to both. Each group records initial_lr."""
        # A router is a small classifier over experts, like lm_head over tokens, and gets its
        # AdamW lr: Muon would move every expert's row by the same amount each step.
        router_params = [moe.router.weight for moe in self.moe_layers()]
        routers = {id(p) for p in router_params}
        matrix_params = [p for p in self.transformer.h.parameters() if p.ndim >= 2 and id(p) not in routers]
        scalar_params = [p for p in self.transformer.h.parameters() if p.ndim < 2]
        embedding_params = [self.transformer.wte.weight]
        lm_head_params = [self.lm_head.weight]
        n_grouped = len(matrix_params) + len(router_params) + len(scalar_params) + 2
        assert n_grouped == len(list(self.parameters())), "setup_optimizers: a parameter has no optimizer"
        # AdamW lrs were tuned at width 768; other widths scale them by 1/sqrt(width / 768).
        scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [dict(params=lm_head_params, lr=unembedding_lr * scale),
                       dict(params=embedding_params, lr=embedding_lr * scale)]
        if router_params:
            adam_groups.append(dict(params=router_params, lr=unembedding_lr * scale))
        if scalar_params:
            adam_groups.append(dict(params=scalar_params, lr=embedding_lr * scale))
        AdamWClass, MuonClass = (DistAdamW, DistMuon) if is_distributed() else (AdamW, Muon)
        adamw = AdamWClass(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=weight_decay)
        muon = MuonClass(matrix_params, lr=matrix_lr, momentum=0.95, weight_decay=weight_decay)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]  # the lr schedule multiplies this
        return optimizers

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logits_at=None):
        """idx (B, T) token ids. Returns logits (B, T, vocab) in fp32 when targets is None
        (logits_at, a (B,) LongTensor of positions: only those, (B, 1, vocab), which saves the
        vocab projection of every other position: prefill and multiple-choice scoring),
        else the cross-entropy loss (targets == -1 are ignored): a scalar for "mean" / "sum",
        per-token (B, T) for "none" (0 at ignored positions).
        MoE: in training mode the "mean" / "sum" loss also holds moe_aux_loss_coef times the
        load-balancing loss (mean over the MoE layers; for "sum" times the counted tokens, so
        that dividing by them gives the mean's value). Per-token losses and eval mode never
        include it. self.moe_aux_loss holds the last forward's value (detached) for logging."""
        B, T = idx.shape
        end = T if kv_cache is None else kv_cache.end(T)
        assert end <= self.cos.size(1), \
            f"sequence of {end} tokens is longer than the rotary table ({self.cos.size(1)} = 10 x sequence_len)"
        cos_sin = (self.cos[:, :T], self.sin[:, :T]) if kv_cache is None else kv_cache.rotary(self.cos, self.sin, T)
        x = self.transformer.wte(idx)
        if x.dtype != self.lm_head.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lm_head.weight.dtype)  # bf16 embedding used outside autocast (plain inference)
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        x = norm(x)
        aux = self._aux_loss(targets, loss_reduction)
        # Soft-cap: logits = softcap * tanh(z / softcap), a smooth clamp to (-softcap, softcap).
        # z / softcap is computed as lm_head(x / softcap): the division runs over n_embd
        # channels instead of vocab_size logits, one pass fewer over the biggest tensor.
        softcap = self.config.softcap
        if targets is not None:
            assert loss_reduction in ("mean", "sum", "none"), f"loss_reduction must be mean|sum|none, got {loss_reduction!r}"
        chunked = (x.device.type == "cpu" and x.dtype == torch.float32 and LOSS_CHUNK_ELEMENTS > 0
                   and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())
        if targets is not None and chunked:
            # same loss, chunked (see ChunkedSoftcapCrossEntropy); GPUs and torch.compile take
            # the plain path below, which the compiler fuses. (Uses lm_head.weight directly.)
            needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.lm_head.weight.requires_grad)
            loss = ChunkedSoftcapCrossEntropy.apply((x / softcap).view(B * T, -1), self.lm_head.weight,
                                                    targets.reshape(-1), softcap, loss_reduction, needs_grad)
            return loss.view(B, T) if loss_reduction == "none" else loss + aux
        if logits_at is not None:
            assert targets is None, "logits_at is for inference: no targets"
            x = x[torch.arange(B, device=x.device), logits_at.to(x.device)][:, None]
        logits = self.lm_head(x / softcap).float()  # fp32 for the tanh and the loss
        logits = softcap * logits.tanh_()  # in place: one vocab-sized allocation fewer
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss + aux

    def moe_balance_loss(self):
        """moe_aux_loss_coef x the load-balancing loss of the last forward (mean over the MoE layers),
        with its gradient; 0 (a Python int) for a dense model. forward adds it to "mean" / "sum"
        losses in training; losses built from per-token values (DPO, RL, distillation) add it themselves."""
        moe = self.moe_layers()
        if not moe:
            return 0
        aux = torch.stack([m.aux_loss for m in moe]).mean()
        self.moe_aux_loss = aux.detach()
        return self.config.moe_aux_loss_coef * aux

    def _aux_loss(self, targets, loss_reduction):
        """The MoE term of the training loss (see forward); 0 (a Python int) for dense models."""
        aux = self.moe_balance_loss()
        if targets is None or not self.training or loss_reduction == "none":
            return 0
        if loss_reduction == "sum":
            return aux * (targets >= 0).sum()
        return aux

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Stream up to max_tokens sampled continuations of one prompt (a list of ids), one id at
        a time, with a KV cache. A bare sampler for training-time samples; the engine does more."""
        assert len(tokens) > 0, "generate: the prompt must contain at least one token"
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        c = self.config
        kv_cache = KVCache(1, c.n_kv_head, len(tokens) + max_tokens, c.n_embd // c.n_head, c.n_layer)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids, kv_cache=kv_cache)[:, -1, :]
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                ids = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                ids = torch.argmax(logits, dim=-1, keepdim=True)
            yield ids.item()
