"""
Knowledge distillation: the loss, computed chunk by chunk over the tokens. (Teacher and student
must share the tokenizer: scripts/chat_distill.py checks both with checkpoint_manager.load_model.)

    loss = alpha * CE(student, targets) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

per token, weighted (w = 0 where targets == -1, special_token_weight on <think> / </think>
targets, 1 elsewhere) and summed; the caller divides by the step's total weight. The T^2 keeps
the soft term's gradient on the same scale as the hard term's whatever the temperature (its
gradient in the logits is (1 - alpha) * T * (q_student - p_teacher)).

Memory. Logits are vocab-sized per token; a student and a teacher would hold two (B*T, V)
tensors plus their softmaxes. Here both models run up to the input of their lm_head only
(lm_head_input), and ChunkedDistillLoss makes the logits a few hundred tokens at a time: per
chunk the softcapped logits of both, the loss, and the gradient with respect to the student's
pre-softcap logits (kept for backward, which is then two matmuls). Peak extra memory: one
(B*T, V) gradient buffer and a chunk's temporaries.

`distill_loss` is the same loss written plainly from full logits: the definition, used by the
tests to check the chunked one (values and gradients).
"""
import torch
import torch.nn.functional as F

# Logits per chunk: 2^21 values (e.g. 256 tokens of a 8192 vocab) keep each temporary ~8 MB.
CHUNK_ELEMENTS = 2 ** 21


# -----------------------------------------------------------------------------
# The loss, plainly (the definition)

def distill_loss(student_logits, teacher_logits, targets, alpha, temperature, weights=None, reduction="mean"):
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T) from full logits (..., V).
    teacher_logits may be None when alpha == 1. targets == -1 are ignored; weights (same shape
    as targets) scale each token. reduction: "mean" (over the total weight) or "sum"."""
    V = student_logits.size(-1)
    s = student_logits.reshape(-1, V).float()
    y = targets.reshape(-1)
    valid = y >= 0
    w = valid.float() if weights is None else weights.reshape(-1).float() * valid
    ce = F.cross_entropy(s, y.clamp(min=0), reduction="none")
    per_token = alpha * ce
    if alpha != 1.0:
        t = teacher_logits.reshape(-1, V).float()
        log_p_teacher = F.log_softmax(t / temperature, dim=-1)
        log_q_student = F.log_softmax(s / temperature, dim=-1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_q_student)).sum(-1)
        per_token = per_token + (1 - alpha) * temperature ** 2 * kl
    total = (w * per_token).sum()
    return total / w.sum().clamp(min=1e-12) if reduction == "mean" else total


# -----------------------------------------------------------------------------
# The loss, chunked, from the models' last hidden states

class ChunkedDistillLoss(torch.autograd.Function):
    """
    Inputs: xs (N, Cs) the student's lm_head input (already divided by its softcap), ws (V, Cs)
    its lm_head weight; xt (N, Ct), wt (V, Ct) the teacher's, or None (alpha == 1); targets (N,)
    with -1 = ignored; weights (N,). Logits = softcap * tanh(x @ w^T), as in nanochat.gpt.
    Returns three scalars: the weighted sum of the loss (differentiable in xs and ws), and the
    weighted sums of CE and of KL (for logging only).
    """

    @staticmethod
    def forward(ctx, xs, ws, xt, wt, targets, weights, alpha, temperature, softcap_s, softcap_t, needs_grad):
        cdt = torch.promote_types(xs.dtype, torch.float32)  # bf16 activations: the loss in fp32
        N, V = xs.size(0), ws.size(0)
        T = temperature
        ws_c = ws.to(cdt)
        use_teacher = xt is not None and alpha != 1.0
        wt_c = wt.to(cdt) if use_teacher else None
        sums = torch.zeros(3, dtype=torch.float64, device=xs.device)  # loss, ce, kl
        dz = torch.empty(N, V, dtype=cdt, device=xs.device) if needs_grad else None
        rows = max(1, CHUNK_ELEMENTS // V)
        # exp(l / T) would overflow fp32 past ~88: at low temperatures shift by the bound softcap / T
        shift_s = softcap_s / T if softcap_s / T > 60 else 0.0
        shift_t = softcap_t / T if use_teacher and softcap_t / T > 60 else 0.0
        # |logits| < softcap, so exp() cannot overflow: softmaxes without the max-subtraction pass,
        # and every vocab-sized temporary is reused in place where the math allows
        for s in range(0, N, rows):
            e = min(N, s + rows)
            n = e - s
            y = targets[s:e]
            w = weights[s:e].to(cdt) * (y >= 0)
            y = y.clamp(min=0)
            rows_idx = torch.arange(n, device=xs.device)
            out = dz[s:e] if needs_grad else None  # tanh(z) lives where the gradient will go
            tanh_s = torch.mm(xs[s:e].to(cdt), ws_c.t(), out=out).tanh_()
            logits_s = tanh_s * softcap_s
            exp_s = logits_s.exp()
            z_s = exp_s.sum(-1)
            log_z = z_s.log()
            ce = log_z - logits_s[rows_idx, y]
            per_token = alpha * ce
            grad = None
            if needs_grad:  # d loss / d logits_s of the hard term: alpha * (softmax - one_hot)
                grad = exp_s.mul_((alpha / z_s)[:, None])
                grad[rows_idx, y] -= alpha
            kl = torch.zeros_like(ce)
            if use_teacher:
                # KL(p_t || q_s) with p_t = softmax(l_t / T), q_s = softmax(l_s / T):
                # sum p_t * (l_t - l_s) / T + log Z(l_s / T) - log Z(l_t / T)
                scaled_t = torch.mm(xt[s:e].to(cdt), wt_c.t()).tanh_().mul_(softcap_t / T)
                p_t = scaled_t.exp() if shift_t == 0 else (scaled_t - shift_t).exp_()
                z_t = p_t.sum(-1)
                log_z_t = z_t.log() + shift_t
                p_t.div_(z_t[:, None])
                scaled_s = logits_s.mul_(1.0 / T)  # logits_s is not needed any more
                q_s = scaled_s.exp() if shift_s == 0 else (scaled_s - shift_s).exp_()
                z_q = q_s.sum(-1)
                log_z_q = z_q.log() + shift_s
                kl = scaled_t.sub_(scaled_s).mul_(p_t).sum(-1) + log_z_q - log_z_t
                per_token = per_token + (1 - alpha) * T ** 2 * kl
                if needs_grad:  # soft term: (1 - alpha) * T^2 * (1/T) * (q_s - p_t)
                    q_s.div_(z_q[:, None]).sub_(p_t)
                    grad.add_(q_s, alpha=(1 - alpha) * T)
            sums[0] += (w * per_token).sum().double()
            sums[1] += (w * ce).sum().double()
            sums[2] += (w * kl).sum().double()
            if needs_grad:  # through the softcap: d logits / d z = softcap * (1 - tanh^2), in place in dz
                tanh_s.square_().neg_().add_(1.0).mul_(grad).mul_((w * softcap_s)[:, None])
        ctx.save_for_backward(xs, ws, dz)
        total, ce_sum, kl_sum = sums.to(cdt).unbind()
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return total, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_total, grad_ce, grad_kl):
        xs, ws, dz = ctx.saved_tensors
        if dz is None:
            raise RuntimeError("ChunkedDistillLoss: backward through a loss computed without grad")
        grad_xs = (dz @ ws.to(dz.dtype)) * grad_total
        grad_ws = (dz.t() @ xs.to(dz.dtype)) * grad_total
        return grad_xs.to(xs.dtype), grad_ws.to(ws.dtype), None, None, None, None, None, None, None, None, None


def chunked_distill_loss(xs, ws, xt, wt, targets, weights, alpha, temperature, softcap_s, softcap_t=None):
    """(loss_sum, ce_sum, kl_sum) of ChunkedDistillLoss; see its docstring."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if xt is None and alpha != 1.0:
        raise ValueError("alpha < 1 needs the teacher's hidden states (xt, wt)")
    if xt is not None and wt.size(0) != ws.size(0):
        raise ValueError(f"teacher vocab {wt.size(0)} != student vocab {ws.size(0)}")
    needs_grad = torch.is_grad_enabled() and (xs.requires_grad or ws.requires_grad)
    return ChunkedDistillLoss.apply(xs, ws, xt, wt, targets.reshape(-1), weights.reshape(-1), float(alpha),
                                    float(temperature), float(softcap_s), float(softcap_t or 0.0), needs_grad)


class _Captured(Exception):
    pass


def lm_head_input(model, idx):
    """Run `model` (a nanochat GPT) on idx (B, T) up to its lm_head and return the lm_head's
    input, (B*T, C): the last normed hidden state divided by the softcap. Uses a forward
    pre-hook that stops the forward there, so no logits are made and gpt.py stays untouched."""
    captured = []

    def hook(module, args):
        captured.append(args[0])
        raise _Captured

    handle = model.lm_head.register_forward_pre_hook(hook)
    try:
        model(idx)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(model).__name__}.forward did not call lm_head on the logits path")
    x = captured[0]
    return x.reshape(-1, x.size(-1))


def model_distill_loss(student, teacher, inputs, targets, weights, alpha, temperature):
    """(loss_sum, ce_sum, kl_sum) of the student (and teacher, None when alpha == 1) on one batch.
    The teacher runs without grad."""
    xs = lm_head_input(student, inputs)
    xt = wt = None
    softcap_t = None
    if teacher is not None and alpha != 1.0:
        with torch.no_grad():
            xt = lm_head_input(teacher, inputs)
        wt, softcap_t = teacher.lm_head.weight, teacher.config.softcap
    return chunked_distill_loss(xs, student.lm_head.weight, xt, wt, targets, weights, alpha, temperature,
                                student.config.softcap, softcap_t)


def token_weights(targets, special_ids, special_token_weight):
    """Per-token loss weights: 0 where targets == -1, special_token_weight where the target is
    one of special_ids (e.g. <think>, </think>), 1 elsewhere."""
    w = (targets >= 0).float()
    if special_ids and special_token_weight != 1.0:
        special = torch.isin(targets, torch.tensor(list(special_ids), device=targets.device))
        w = torch.where(special, w * special_token_weight, w)
    return w
