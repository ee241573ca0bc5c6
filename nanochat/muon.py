"""Muon: momentum, then orthogonalize the update, for the 2-D weight matrices of the blocks.

For a weight matrix the update Muon applies is the momentum-smoothed gradient G with its
singular values pushed to ~1 (roughly U V^T from G = U S V^T): every direction the gradient
points in moves by about the same amount, instead of a few dominant ones taking the whole
step. The polar factor is approximated by a few Newton-Schulz iterations, which are only
matmuls and so run fast in bf16 on a GPU.

`Muon` is single-process. `DistMuon` averages gradients across ranks and shards the work and
the momentum state: the orthogonalization needs a whole matrix, so matrices (not slices of
them) are dealt out to ranks round-robin. Matrices of one shape are taken world_size at a
time: a reduce-scatter gives each rank the averaged gradient of the one matrix it owns in
the chunk, the owner updates it, and an all-gather sends every updated matrix to every rank.
A short last chunk is padded with zero tensors, so any count and any shape works (nothing
requires a dimension to divide the world size).

Both accept tensors with more than 2 dims (a stack of matrices, e.g. MoE experts): the
orthogonalization works on the last two.
"""
import torch
import torch.distributed as dist

# Coefficients of the quintic p(x) = a x + b x^3 + c x^5 applied to the singular values.
# Chosen (Keller Jordan, modded-nanogpt) for the steepest rise at 0 rather than exact
# convergence to 1: after 5 steps singular values land in roughly [0.7, 1.2], which is
# what the optimizer needs, at a fraction of the cost of an exact polar decomposition.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G, steps=5, dtype=None):
    """Approximate orthogonalization of G (or of each matrix in a stack, last two dims). dtype of
    the iteration: default bf16 on CUDA (matmuls at full tensor-core speed; the iteration tolerates
    the noise), fp32 elsewhere (CPU bf16 matmuls are slow)."""
    assert G.ndim >= 2, f"Newton-Schulz needs a matrix, got shape {tuple(G.shape)}"
    a, b, c = NS_COEFFS
    X = G.to(dtype or (torch.bfloat16 if G.is_cuda else torch.float32))
    X = X.reshape(-1, *G.shape[-2:])  # a batch of matrices, so one code path serves 2-D and stacks
    # Iterate on the wide orientation so X @ X^T is the smaller Gram matrix.
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    # Scale so the largest singular value is <= 1 (Frobenius norm bounds the spectral norm),
    # inside the region where the iteration converges.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = torch.bmm(X, X.mT)
        # baddbmm folds the scalar multiplies and the add into the matmul: B = b A + c A A,
        # X = a X + B X, in 3 kernels per step instead of 8 (matters for small matrices)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    if tall:
        X = X.mT
    return X.reshape(G.shape)


def muon_update(p, grad, momentum_buffer, lr, momentum, nesterov, ns_steps, weight_decay):
    """One Muon step on p (in place): Nesterov momentum, orthogonalize, scale, apply."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    update = grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer
    update = zeropower_via_newtonschulz5(update, ns_steps)
    # An orthogonal update of a tall matrix has a smaller per-entry RMS than a wide one's;
    # rescale so each output row moves at about the same rate whatever the aspect ratio.
    scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    p.add_(update.to(p.dtype), alpha=-lr * scale)


_DEFAULTS = dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0)


def _muon_step_one(optimizer, group, p, grad):
    state = optimizer.state[p]
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(grad)
    muon_update(p, grad, state["momentum_buffer"], group["lr"], group["momentum"],
                group["nesterov"], group["ns_steps"], group["weight_decay"])


class Muon(torch.optim.Optimizer):
    """lr and momentum live in each param group, so a schedule can change them per step
    (the training script warms momentum up from 0.85 to 0.95)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                assert p.ndim >= 2, f"Muon is for matrices; got a parameter of shape {tuple(p.shape)}"

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    _muon_step_one(self, group, p, p.grad)


class DistMuon(torch.optim.Optimizer):
    """Muon with gradients averaged across ranks and matrices dealt out to ranks (see the
    module docstring). Every rank must call step(). A parameter with no gradient counts as a
    zero gradient, so that all ranks issue the same collectives.

    Clipping by the global norm (nanochat.training.clip_grad_norm): reduce_gradients() averages
    the gradients first and returns the squared norm of the matrices this rank owns (the sum
    over ranks is the squared norm of the averaged gradient); the caller sets grad_scale, which
    the next step() applies to the averaged gradient (and then resets to 1)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, weight_decay=weight_decay))
        # Re-group by shape: a reduce-scatter / all-gather over a list wants equal shapes.
        # Each new group keeps its source group's settings; the order is deterministic, so
        # every rank derives the same groups and the same owners.
        groups = []
        for group in self.param_groups:
            for p in group["params"]:
                assert p.ndim >= 2, f"Muon is for matrices; got a parameter of shape {tuple(p.shape)}"
            for shape in dict.fromkeys(p.shape for p in group["params"]):
                same = [p for p in group["params"] if p.shape == shape]
                groups.append({**group, "params": same})
        self.param_groups = groups
        self.grad_scale = 1.0
        self._pending = None  # gradient reductions launched and not yet consumed by step()

    def _launch_reductions(self):
        rank, world_size = dist.get_rank(), dist.get_world_size()
        # Gloo (CPU) implements no reduce_scatter: reduce each gradient to the rank that owns
        # its matrix instead (the same data lands in the same place; the owner divides).
        has_reduce_scatter = dist.get_backend() == "nccl"
        # Owners rotate across chunks (not restarting at rank 0), so the short chunks left by
        # each shape do not all land on the same rank.
        pending = []
        next_owner = 0
        for group in self.param_groups:
            params = group["params"]
            for base in range(0, len(params), world_size):
                chunk = params[base:base + world_size]
                owners = [(next_owner + j) % world_size for j in range(len(chunk))]
                next_owner = (next_owner + len(chunk)) % world_size
                slots = [None] * world_size  # slot r: the matrix rank r owns (None: padding)
                for owner, p in zip(owners, chunk):
                    slots[owner] = p
                grads = [torch.zeros_like(chunk[0]) if p is None or p.grad is None else p.grad for p in slots]
                if has_reduce_scatter:
                    grad = torch.empty_like(chunk[0])
                    works = [dist.reduce_scatter(grad, grads, op=dist.ReduceOp.AVG, async_op=True)]
                else:
                    grads = [g.clone() for g in grads]  # leave p.grad as this rank computed it
                    works = [dist.reduce(g, dst=owner, op=dist.ReduceOp.SUM, async_op=True)
                             for owner, g in enumerate(grads)]
                    grad = grads[rank]
                divisor = 1 if has_reduce_scatter else world_size
                pending.append({"group": group, "slots": slots, "grad": grad, "works": works, "divisor": divisor})
        return pending

    @staticmethod
    def _finish(item, rank):
        """Wait for one chunk's reduction; afterwards item["grad"] is the averaged gradient of
        the matrix this rank owns in the chunk (meaningless if it owns none)."""
        if item["works"]:
            for work in item["works"]:
                work.wait()
            item["works"] = []
            if item["divisor"] != 1 and item["slots"][rank] is not None:
                item["grad"].div_(item["divisor"])

    @torch.no_grad()
    def reduce_gradients(self):
        """Average the gradients across ranks now; return the squared norm of our matrices'."""
        rank = dist.get_rank()
        self._pending = self._launch_reductions()
        sq = torch.zeros((), dtype=torch.float32, device=self.param_groups[0]["params"][0].device)
        for item in self._pending:
            self._finish(item, rank)
            if item["slots"][rank] is not None:
                sq += item["grad"].float().square().sum()
        return sq

    @torch.no_grad()
    def step(self):
        rank = dist.get_rank()
        # Phase 1 (unless reduce_gradients did it): launch every gradient reduction at once,
        # so communication overlaps with the updates below.
        pending = self._pending if self._pending is not None else self._launch_reductions()
        self._pending = None
        grad_scale, self.grad_scale = self.grad_scale, 1.0
        # Phase 2: update the matrix we own in each chunk, then all-gather the chunk.
        gathers = []
        for item in pending:
            self._finish(item, rank)
            group, slots, grad = item["group"], item["slots"], item["grad"]
            p = slots[rank]
            if p is not None:
                if grad_scale != 1.0:
                    grad.mul_(grad_scale)
                _muon_step_one(self, group, p, grad)
                send = p.clone()  # p is also an output slot of the gather: send a copy, not an alias
            else:
                send = torch.zeros_like(grad)  # padding slot of a short chunk
            outputs = [torch.empty_like(grad) if q is None else q for q in slots]
            gathers.append(dist.all_gather(outputs, send, async_op=True))
        for work in gathers:
            work.wait()
