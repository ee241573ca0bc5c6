"""AdamW for the embedding, the unembedding (lm_head) and any non-matrix parameters.

`AdamW` is a plain single-process AdamW whose arithmetic follows torch.optim.AdamW's
(decoupled weight decay, bias correction), so the two agree in the tests.

`DistAdamW` is the same update with its state sharded across ranks (ZeRO-1 style), which
replaces the DDP wrapper: each parameter is flattened and padded to a multiple of the world
size; the gradient is reduce-scattered (averaged), each rank updates its 1/world slice of
the parameter with its 1/world slice of the moments, and the slices are all-gathered back.
Adam is elementwise, so updating a slice gives exactly what updating the whole would.
"""
import math

import torch
import torch.distributed as dist


def adamw_update(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step on p (in place). Same operations in the same order as torch's
    single-tensor AdamW, so results match to the last bit on CPU."""
    if weight_decay:  # (torch multiplies by 1.0 when it is 0: skipping is bit-identical)
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    denom = exp_avg_sq.sqrt().div_(math.sqrt(bias_correction2)).add_(eps)  # in place: one temporary, not two
    p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                             group["lr"], beta1, beta2, group["eps"], group["weight_decay"])


def _flat_padded(t, world_size):
    """t as a 1-D buffer whose length is a multiple of world_size. A view of t when no padding
    is needed (so an update of the buffer is an update of t), else a zero-padded copy."""
    n = t.numel()
    padded_len = math.ceil(n / world_size) * world_size
    if padded_len == n and t.is_contiguous():
        return t.view(-1)
    buf = torch.zeros(padded_len, dtype=t.dtype, device=t.device)
    buf[:n].copy_(t.reshape(-1))
    return buf


class DistAdamW(torch.optim.Optimizer):
    """AdamW with gradients averaged across ranks and the state sharded (1/world per rank).
    Every rank must call step() (it runs collectives). A parameter with no gradient counts as
    a zero gradient, so that all ranks issue the same collectives.

    Clipping by the global norm (nanochat.training.clip_grad_norm): reduce_gradients() averages
    the gradients first and returns the squared norm of this rank's shards (the sum over ranks
    is the squared norm of the averaged gradient); the caller sets grad_scale, which the next
    step() applies to the averaged gradient (and then resets to 1)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.grad_scale = 1.0
        self._pending = None  # gradient reductions launched and not yet consumed by step()

    def _launch_reductions(self):
        rank, world_size = dist.get_rank(), dist.get_world_size()
        # Gloo (CPU) implements no reduce_scatter: all_reduce the whole gradient and keep our
        # slice. Same result, twice the traffic; fine for the CPU tests and small CPU runs.
        has_reduce_scatter = dist.get_backend() == "nccl"
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                grad_buf = _flat_padded(grad, world_size)
                shard_len = grad_buf.numel() // world_size
                if has_reduce_scatter:
                    grad_shard = torch.empty(shard_len, dtype=grad.dtype, device=grad.device)
                    work = dist.reduce_scatter_tensor(grad_shard, grad_buf, op=dist.ReduceOp.AVG, async_op=True)
                else:
                    if grad_buf.data_ptr() == grad.data_ptr():
                        grad_buf = grad_buf.clone()  # leave p.grad as this rank computed it
                    work = dist.all_reduce(grad_buf, op=dist.ReduceOp.SUM, async_op=True)
                    grad_shard = grad_buf[rank * shard_len:(rank + 1) * shard_len]
                divisor = 1 if has_reduce_scatter else world_size
                pending.append({"group": group, "p": p, "grad": grad_shard, "work": work, "divisor": divisor})
        return pending

    @staticmethod
    def _finish(item):
        """Wait for one reduction; afterwards item["grad"] is our shard of the averaged gradient."""
        if item["work"] is not None:
            item["work"].wait()
            item["work"] = None
            if item["divisor"] != 1:
                item["grad"].div_(item["divisor"])

    @torch.no_grad()
    def reduce_gradients(self):
        """Average the gradients across ranks now; return the squared norm of our shards."""
        self._pending = self._launch_reductions()
        sq = torch.zeros((), dtype=torch.float32, device=self.param_groups[0]["params"][0].device)
        for item in self._pending:
            self._finish(item)
            sq += item["grad"].float().square().sum()
        return sq

    @torch.no_grad()
    def step(self):
        rank, world_size = dist.get_rank(), dist.get_world_size()
        has_reduce_scatter = dist.get_backend() == "nccl"
        # Phase 1 (unless reduce_gradients did it): launch every gradient reduction at once,
        # so communication overlaps with the updates below.
        pending = self._pending if self._pending is not None else self._launch_reductions()
        self._pending = None
        grad_scale, self.grad_scale = self.grad_scale, 1.0
        # Phase 2: update our slice of each parameter, then all-gather the slices.
        gathers = []
        for item in pending:
            self._finish(item)
            group, p, grad_shard = item["group"], item["p"], item["grad"]
            if grad_scale != 1.0:
                grad_shard.mul_(grad_scale)
            param_buf = _flat_padded(p, world_size)
            shard_len = param_buf.numel() // world_size
            param_shard = param_buf[rank * shard_len:(rank + 1) * shard_len]
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(param_shard)
                state["exp_avg_sq"] = torch.zeros_like(param_shard)
            state["step"] += 1
            beta1, beta2 = group["betas"]
            adamw_update(param_shard, grad_shard, state["exp_avg"], state["exp_avg_sq"], state["step"],
                         group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            # The gathered output is param_buf itself; send a copy of our slice so the input
            # never aliases the output.
            if has_reduce_scatter:
                work = dist.all_gather_into_tensor(param_buf, param_shard.clone(), async_op=True)
            else:
                slices = list(param_buf.split(shard_len))
                work = dist.all_gather(slices, param_shard.clone(), async_op=True)
            gathers.append((p, param_buf, work))
        for p, param_buf, work in gathers:
            work.wait()
            if param_buf.data_ptr() != p.data_ptr():  # padded copy: write it back into p
                p.copy_(param_buf[:p.numel()].view_as(p))
