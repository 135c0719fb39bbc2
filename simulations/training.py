"""Vectorized local training of N stacked models: one forward, one backward, one optimizer step.

The N models of a simulation (or the L of one shard) are stacked along a leading node axis and
stored as views into :class:`gossip.flat.FlatParams` buffers ``[L, P]``, the same layout the
algorithms average. A training step runs all rows at once:

- **forward**: for ``nn.Sequential`` MLPs of Linear/ReLU/Tanh a hand-written batched matmul
  (``torch.baddbmm``); otherwise ``torch.func.functional_call`` under ``torch.vmap``; models that
  cannot be vmapped (BatchNorm with running statistics) fall back to a per-node loop over the
  same stacked state. ``impl="auto"`` picks the first that applies.
- **backward**: one, of the sum of the per-node mean losses, so row i's gradient is exactly node
  i's gradient.
- **optimizer**: element-wise rules over ``[L, ...]`` tensors are L independent optimizers. SGD
  is the stock ``torch.optim.SGD`` (momentum buffers created as zeros up front, which makes a
  node's first step equal to torch's ``clone(grad)``), built only when the autograd path needs
  it (:class:`PlainSGD`: constructing it imports torch's compiler stack). Adam/AdamW are
  :class:`RowAdam`: torch's single-tensor Adam update, op for op, but with one step count per
  row, because torch keeps a single scalar ``step`` per tensor and nodes that skip steps need
  their own bias correction (torch's tensor-valued ``capturable`` step is not supported on CPU).
- **masks**: a node that does not train on a step (down, straggling, or done with its local
  epoch) keeps its parameters, optimizer state and step count bit for bit: the step runs on all
  rows and the idle rows are restored (:func:`gossip.algorithms._common.frozen_rows`); a zero
  gradient would not be a skipped step.
- **clipping**: ``grad_clip`` clips each node's gradient norm (over all its tensors) separately.
- **fused SGD** (the common case: SGD on a plain MLP, no clipping): forward and backward written
  out by hand in chunks of rows that fit in cache, every weight updated in place by the
  batched product that forms its gradient, and only the active rows computed (gathered, updated,
  scattered back) instead of computing all rows and restoring the idle ones. Same update as
  ``torch.optim.SGD`` up to float32 rounding; no gradient tensors, so peak memory is about the
  parameters plus one chunk's activations (:meth:`LocalTrainer.fused_applies`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from gossip.algorithms._common import frozen_rows
from gossip.flat import FlatParams, ScopeFn, default_vc_scope
from gossip.ops import to_device
from gossip.run.build import node_model
from gossip.run.spec import optimizer_class
from gossip.scratch import Scratch
from gossip.tasks import Task

__all__ = ["IMPLS", "LocalTrainer", "PlainSGD", "RowAdam", "StackedModel", "choose_impl",
           "mlp_plan"]

IMPLS = ("matmul", "vmap", "loop")
#: Floats of activations one evaluation chunk may hold (4 MiB in fp32: about a core's cache).
EVAL_BUDGET = 1 << 20

Plan = list[tuple[str, str | None, str | None]]


# ----------------------------------------------------------------------------- model structure


def mlp_plan(model: nn.Module) -> Plan | None:
    """The layers of an ``nn.Sequential`` of Linear/ReLU/Tanh/Identity, else None."""
    if type(model) is not nn.Sequential or any(True for _ in model.buffers()):
        return None
    plan: Plan = []
    for name, m in model.named_children():
        if type(m) is nn.Linear:
            bias = f"{name}.bias" if m.bias is not None else None
            plan.append(("linear", f"{name}.weight", bias))
        elif type(m) is nn.ReLU:
            plan.append(("relu", None, None))
        elif type(m) is nn.Tanh:
            plan.append(("tanh", None, None))
        elif type(m) is not nn.Identity:
            return None
    return plan if any(op == "linear" for op, _, _ in plan) else None


def _has_running_stats(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for m in model.modules())


def choose_impl(model: nn.Module, impl: str = "auto") -> str:
    """``matmul`` for plain MLPs, ``loop`` with BatchNorm running stats, else ``vmap``."""
    if impl == "auto":
        if mlp_plan(model) is not None:
            return "matmul"
        return "loop" if _has_running_stats(model) else "vmap"
    if impl not in IMPLS:
        raise ValueError(f"train_impl must be 'auto' or one of {list(IMPLS)}, got {impl!r}")
    if impl == "matmul" and mlp_plan(model) is None:
        raise ValueError("train_impl='matmul' needs an nn.Sequential of Linear/ReLU/Tanh, got "
                         f"{type(model).__name__}")
    if impl == "vmap" and _has_running_stats(model):
        raise ValueError("train_impl='vmap' cannot update BatchNorm running stats; use 'loop'")
    return impl


def _mlp_forward(plan: Plan, params: dict[str, Tensor], h: Tensor) -> Tensor:
    """Batched MLP: ``h`` [L, B, in] -> [L, B, out] (weights [L, out, in], biases [L, out])."""
    for op, w_name, b_name in plan:
        if op == "linear":
            w = params[w_name].transpose(1, 2)
            h = torch.bmm(h, w) if b_name is None else torch.baddbmm(
                params[b_name].unsqueeze(1), h, w)
        elif op == "relu":
            h = torch.relu(h)
        else:
            h = torch.tanh(h)
    return h


def _mlp_forward_shared(plan: Plan, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """The same MLP for L nodes on one shared input ``x`` [T, in] -> [L, T, out].

    Computed feature-major, ``h`` [L, features, T] = ``W @ h`` (the weights read as stored,
    the bias added by the same ``baddbmm``, activations in place): about twice as fast on a
    CPU as ``h @ W^T`` with a separate bias add (measured on the digits MLP, 1000 nodes on its
    360 test samples). The result is a transposed view.
    """
    h = x.T.unsqueeze(0).expand(next(iter(params.values())).shape[0], *x.T.shape)
    fresh = False  # whether h is ours to overwrite (not the caller's x)
    for op, w_name, b_name in plan:
        if op == "linear":
            assert w_name is not None
            w = params[w_name]
            h = torch.bmm(w, h) if b_name is None else torch.baddbmm(
                params[b_name].unsqueeze(2), w, h)
            fresh = True
        elif op == "relu":
            h = h.relu_() if fresh else torch.relu(h)
        else:
            h = h.tanh_() if fresh else torch.tanh(h)
    return h.transpose(1, 2)


# ----------------------------------------------------------------------------- stacked model


class StackedModel:
    """L copies of one architecture, stacked: parameters in flat buffers, buffers stacked.

    Args:
        task: makes the models (``task.make_model(seed)``) and defines the loss.
        nodes: global node ids of the rows.
        seed: model seed; a node's model is ``make_model(seed)`` when ``same_init`` else
            ``make_model(seed + node)`` (the real launcher's convention).
        device: where the rows live.
        impl: ``auto`` | ``matmul`` | ``vmap`` | ``loop``.
        scope: variance-correction scope of :class:`FlatParams`.
    """

    def __init__(self, task: Task, nodes: Sequence[int], *, seed: int, same_init: bool,
                 device: torch.device | str = "cpu", impl: str = "auto",
                 scope: ScopeFn = default_vc_scope) -> None:
        nodes = [int(i) for i in nodes]
        if not nodes:
            raise ValueError("nodes is empty")
        self.task = task
        self.nodes = nodes
        self.rows = len(nodes)
        self.device = torch.device(device)
        # (frozen parameters: the run's one set, held once for every row; node_model's doc)
        base = node_model(task, seed, nodes[0], same_init=same_init).to(self.device)
        self.base = base
        self.impl = choose_impl(base, impl)
        self.plan = mlp_plan(base) if self.impl == "matmul" else None
        rows = self.rows
        named = {n: p for n, p in base.named_parameters() if p.requires_grad}
        self.flat = FlatParams.from_stacked(
            {n: p.detach().unsqueeze(0).expand(rows, *p.shape) for n, p in named.items()},
            base, scope)
        self.params: dict[str, nn.Parameter] = self.flat.named_views()
        self.buffers: dict[str, Tensor] = {
            n: b.detach().unsqueeze(0).expand(rows, *b.shape).clone()
            for n, b in base.named_buffers()}
        if not same_init:
            with torch.no_grad():
                for row, node in enumerate(nodes[1:], start=1):
                    model = task.make_model(seed + node)
                    for n, p in model.named_parameters():
                        if n in self.params:
                            self.params[n][row].copy_(p.detach())
                    for n, b in model.named_buffers():
                        self.buffers[n][row].copy_(b)
        self._vmapped: Callable[..., Tensor] | None = None
        self._vmapped_shared: Callable[..., Tensor] | None = None
        self._widest: int | None = None

    @property
    def parameters(self) -> list[nn.Parameter]:
        return list(self.params.values())

    def state_tensors(self) -> list[Tensor]:
        """Every per-row tensor of the models (parameters and buffers)."""
        return [*self.params.values(), *self.buffers.values()]

    # --------------------------------------------------------------------- forward

    def _call(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def forward(self, x: Tensor) -> Tensor:
        """Outputs of every row on its own input: ``x`` [L, B, ...] -> [L, B, ...] (matmul/vmap)."""
        if self.impl == "matmul":
            assert self.plan is not None
            return _mlp_forward(self.plan, self.params, x)
        if self.impl == "vmap":
            if self._vmapped is None:
                self._vmapped = torch.vmap(self._call, randomness="different")
            return self._vmapped(self.params, self.buffers, x)
        raise RuntimeError("forward() is not available with impl='loop'; use node_losses()")

    def node_losses(self, x: Tensor, y: Tensor, active: Tensor | None = None) -> Tensor:
        """Per-node mean losses [L] (a graph to backprop through). With ``impl='loop'`` only the
        ``active`` rows run (their BatchNorm statistics update); the others are 0."""
        if self.impl != "loop":
            return _per_node_loss(self.task, self.forward(x), y)
        rows = range(self.rows) if active is None else active.nonzero().flatten().tolist()
        out = torch.zeros(self.rows, device=x.device)
        losses = []
        for row in rows:
            p = {n: t[row] for n, t in self.params.items()}
            b = {n: t[row] for n, t in self.buffers.items()}
            losses.append(self.task.loss(self._call(p, b, x[row]), y[row]))
        if not losses:
            return out
        index = torch.as_tensor(list(rows), device=x.device)
        return out.index_put((index,), torch.stack(losses).to(out.dtype))

    # --------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, rows: Tensor | slice | None = None
                 ) -> tuple[Tensor, Tensor | None]:
        """The rows ``rows`` (local indices, or a slice of them, read in place; default all) on
        the shared set ``(x, y)``: mean loss and accuracy (None for regression), float64, one
        entry per row. One vectorized forward per chunk of rows and samples, each chunk's
        activations about :data:`EVAL_BUDGET` floats on a CPU (sized to stay in cache) and 64
        times that on a GPU (fewer, larger kernels)."""
        kind = self.task.data.kind
        start, index = 0, None
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.rows)
            assert step == 1, "a slice of rows is contiguous"
            count_rows = max(0, stop - start)
        else:
            if rows is not None:
                index = to_device(torch.as_tensor(rows, dtype=torch.long), self.device)
            count_rows = self.rows if index is None else len(index)
        n = x.shape[0]
        per_sample = self._width() * max(1, y[0].numel() if y.dim() > 1 else 1)
        budget = EVAL_BUDGET * (1 if self.device.type == "cpu" else 64)
        samples = max(1, min(n, budget // per_sample))
        nodes = max(1, budget // (per_sample * samples))
        loss = torch.zeros(count_rows, dtype=torch.float64, device=x.device)
        hits = torch.zeros_like(loss)
        count = 0
        was_training = self.base.training
        if self.plan is None:  # a plain MLP (the matmul impl) behaves the same in both modes
            self.base.eval()
        try:
            if self.task.loss_fn is not None:  # the task's own loss, over the whole set
                return self._evaluate_own_loss(x, y, start, index, count_rows, samples,
                                               max(1, budget // (per_sample * n)))
            for s0 in range(0, n, samples):
                xs, ys = x[s0:s0 + samples], y[s0:s0 + samples]
                count += ys.numel()
                for r0 in range(0, count_rows, nodes):
                    r1 = min(count_rows, r0 + nodes)
                    sel = slice(start + r0, start + r1) if index is None else index[r0:r1]
                    out = self._eval_forward(xs, sel)
                    lsum, hsum = _per_node_sums(kind, out, ys)
                    loss[r0:r1] += lsum
                    if hsum is not None:
                        hits[r0:r1] += hsum
        finally:
            if self.plan is None:
                self.base.train(was_training)
        return loss / count, (hits / count if kind != "regression" else None)

    def _evaluate_own_loss(self, x: Tensor, y: Tensor, start: int, index: Tensor | None,
                           count_rows: int, samples: int, nodes: int
                           ) -> tuple[Tensor, Tensor | None]:
        """:meth:`evaluate` of a task with its own ``loss_fn``: each row's outputs on the whole
        set, then ``task.loss`` of them once, as a real rank evaluates
        (:func:`launch.rank.evaluate`: ``task.metrics`` of every output; a loss need not be a
        mean of per-sample terms, so chunks' losses cannot be combined). ``nodes`` rows at a
        time, their outputs sample chunk by sample chunk (``samples``)."""
        kind = self.task.data.kind
        loss = torch.zeros(count_rows, dtype=torch.float64, device=x.device)
        hits = torch.zeros_like(loss)
        for r0 in range(0, count_rows, nodes):
            r1 = min(count_rows, r0 + nodes)
            sel = slice(start + r0, start + r1) if index is None else index[r0:r1]
            out = torch.cat([self._eval_forward(x[s0:s0 + samples], sel)
                             for s0 in range(0, x.shape[0], samples)], dim=1)
            for k in range(r1 - r0):  # one call per row: the very call a real rank makes
                loss[r0 + k] = self.task.loss(out[k], y).to(torch.float64)
            if kind != "regression":
                hits[r0:r1] = (out.argmax(dim=-1) == y).reshape(r1 - r0, -1).sum(1).double()
        return loss, (hits / y.numel() if kind != "regression" else None)

    def _eval_forward(self, x: Tensor, sel: slice | Tensor) -> Tensor:
        params = {n: t[sel] for n, t in self.params.items()}
        if self.impl == "matmul":
            assert self.plan is not None
            return _mlp_forward_shared(self.plan, params, x)
        buffers = {n: t[sel] for n, t in self.buffers.items()}
        if self.impl == "vmap":
            if self._vmapped_shared is None:
                self._vmapped_shared = torch.vmap(self._call, in_dims=(0, 0, None),
                                                  randomness="different")
            return self._vmapped_shared(params, buffers, x)
        rows = next(iter(params.values())).shape[0]
        return torch.stack([
            self._call({n: t[i] for n, t in params.items()},
                       {n: t[i] for n, t in buffers.items()}, x) for i in range(rows)])

    def _width(self) -> int:
        """The widest layer's output (sizes activation chunks); the architecture is fixed."""
        if self._widest is None:
            widths = [m.out_features for m in self.base.modules() if isinstance(m, nn.Linear)]
            widths += [m.embedding_dim for m in self.base.modules()
                       if isinstance(m, nn.Embedding)]
            self._widest = max(widths, default=64)
        return self._widest


def _per_node_loss(task: Task, out: Tensor, y: Tensor) -> Tensor:
    """``task.loss`` of each row: out [L, B, ...], y [L, B, ...] -> [L]."""
    rows = out.shape[0]
    kind = task.data.kind
    if task.loss_fn is not None:  # the user's loss, per node
        return torch.vmap(task.loss)(out, y)
    if kind in ("classification", "lm"):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                               reduction="none").view(rows, -1).mean(dim=1)
    if kind == "regression":
        return F.mse_loss(out, y, reduction="none").reshape(rows, -1).mean(dim=1)
    return torch.vmap(task.loss)(out, y)


def _argmax_classes(scores: Tensor) -> Tensor:
    """``scores.argmax(dim=1)`` of ``[L, K, T]`` (the first maximal class, a NaN counting as
    maximal), built from ``amax``: torch's argmax over a middle axis is ~5x slower on a CPU
    (1.7 ms against 0.34 ms for 22 nodes x 10 classes x 360 samples)."""
    k = scores.shape[1]
    rank = torch.arange(k, 0, -1, dtype=torch.float32, device=scores.device).view(1, k, 1)
    top = (scores == scores.amax(dim=1, keepdim=True)) | scores.isnan()
    return k - top.mul(rank).amax(dim=1).long()


def _per_node_sums(kind: str, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
    """Sum of per-element losses and of hits for each row of ``out`` [L, T, ...] on shared y.

    Outputs that are a transposed view of class-major ``[L, K, T]`` (the batched MLP's,
    :func:`_mlp_forward_shared`) are reduced over the classes where they lie: a log-softmax or
    argmax over a last axis of 10 classes runs ~9x slower on a CPU than over a middle axis with
    the samples innermost (measured: 66 against 7 ms for 1,000 nodes on 360 samples)."""
    rows = out.shape[0]
    target = y.unsqueeze(0).expand(rows, *y.shape)
    if kind == "regression":
        return F.mse_loss(out, target, reduction="none").reshape(rows, -1).sum(1).double(), None
    if out.dim() == 3 and out.transpose(1, 2).is_contiguous():
        scores = out.transpose(1, 2)  # [L, K, T]
        picked = scores.gather(1, target.unsqueeze(1)).squeeze(1)
        loss = (torch.logsumexp(scores, dim=1) - picked).sum(1)
        hits = (_argmax_classes(scores) == target).sum(1)
        return loss.double(), hits.double()
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction="none")
    hits = (out.argmax(dim=-1) == target).reshape(rows, -1).sum(1)
    return loss.view(rows, -1).sum(1).double(), hits.double()


# ----------------------------------------------------------------------------- optimizers


class RowAdam(torch.optim.Optimizer):
    """Adam / AdamW over ``[L, ...]`` tensors whose rows are independent models.

    The update is torch's single-tensor Adam (``torch.optim.Adam``, ``amsgrad=False``,
    ``foreach=False``) op for op, except that ``state["step"]`` holds one count per row [L], so
    each row gets its own bias correction. Rows whose step must be skipped are restored by the
    caller (their count included).

    Args:
        params: tensors of shape [L, ...] (every row a node).
        lr, betas, eps: as in ``torch.optim.Adam``.
        weight_decay: L2 penalty (Adam) or decoupled decay (AdamW).
        decoupled: AdamW's decoupled weight decay.
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, decoupled: bool = False) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "decoupled": decoupled}
        super().__init__(params, defaults)

    def init_state(self) -> None:
        """Create every tensor's state now (so masked first steps can be restored)."""
        for group in self.param_groups:
            for p in group["params"]:
                self._state(p)

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            eps, wd = group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self._state(p)
                step_t, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
                step_t += 1
                if wd != 0:
                    if group["decoupled"]:
                        p.mul_(1 - lr * wd)
                    else:
                        grad = grad.add(p, alpha=wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                shape = (p.shape[0],) + (1,) * (p.dim() - 1)
                step = step_t.to(torch.float64)
                bias_correction1 = 1 - torch.pow(beta1, step)
                bias_correction2 = 1 - torch.pow(beta2, step)
                step_size = (lr / bias_correction1).to(p.dtype).view(shape)
                bias_correction2_sqrt = bias_correction2.sqrt().to(p.dtype).view(shape)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                # torch: p.addcdiv_(exp_avg, denom, value=-step_size)
                p.sub_((exp_avg / denom).mul_(step_size))
        return loss


#: Stock torch optimizers whose rule is element-wise with no step-dependent factor, so one
#: instance over ``[L, ...]`` tensors is exactly L independent optimizers (Adagrad only with
#: ``lr_decay=0``: its decay reads one step count per tensor).
ELEMENTWISE = (torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta)
_ROW_ADAM_ARGS = {"betas", "eps", "weight_decay"}


def make_optimizer(name: str, params: list[nn.Parameter], *, lr: float, momentum: float = 0.0,
                   weight_decay: float | None = None, extra: dict[str, Any] | None = None,
                   ) -> torch.optim.Optimizer | PlainSGD:
    """The inner optimizer over stacked rows, exactly L independent ones, every state tensor
    created up front (so masked first steps can be restored).

    ``name`` is anything :func:`gossip.run.spec.optimizer_class` takes. SGD is
    :class:`PlainSGD` (no ``torch.optim.SGD`` until one is needed; the stock one where
    ``extra`` names a setting PlainSGD does not hold), momentum buffers pre-created as zeros;
    Adam or AdamW :class:`RowAdam` (one step count per row), RMSprop, Adagrad and Adadelta the
    stock ones (:data:`ELEMENTWISE`). Any other rule may mix rows or count steps per tensor:
    refused with a ValueError naming it.
    """
    cls = optimizer_class(name)
    extra = dict(extra or {})
    if momentum and cls is not torch.optim.SGD:
        raise ValueError(f"momentum={momentum!r} is invalid with optimizer={name!r}: expected 0 "
                         "(momentum is for sgd)")
    if cls is torch.optim.SGD:
        kwargs = {"momentum": momentum, "weight_decay": weight_decay or 0.0, **extra}
        if set(kwargs) <= PlainSGD.SETTINGS:
            return PlainSGD(params, lr=lr, **kwargs)
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, **kwargs)
        if opt.param_groups[0]["momentum"]:
            for p in params:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return opt
    if cls in (torch.optim.Adam, torch.optim.AdamW):
        unknown = sorted(set(extra) - _ROW_ADAM_ARGS)
        if unknown:
            raise ValueError(f"optimizer_args {unknown} are not supported by the simulator's "
                             f"stacked {cls.__name__} (it takes {sorted(_ROW_ADAM_ARGS)})")
        decoupled = cls is torch.optim.AdamW
        wd = extra.pop("weight_decay", weight_decay)
        opt = RowAdam(params, lr=lr, weight_decay=(0.01 if decoupled else 0.0) if wd is None
                      else wd, decoupled=decoupled, **extra)
        opt.init_state()
        return opt
    if issubclass(cls, ELEMENTWISE) and cls in ELEMENTWISE:
        if weight_decay is not None:
            extra.setdefault("weight_decay", weight_decay)
        opt = cls(params, lr=lr, **extra)
        if cls is torch.optim.Adagrad and opt.param_groups[0]["lr_decay"]:
            raise ValueError("optimizer_args lr_decay is not supported by the simulator: Adagrad "
                             "decays with one step count per tensor, not per node")
        _init_state(opt)
        return opt
    raise ValueError(
        f"optimizer={name!r} is not supported by the simulator: it trains N nodes as one "
        "[N, ...] tensor per parameter, exact only for element-wise rules with per-node state "
        "(sgd, adam, adamw, RMSprop, Adagrad, Adadelta)")


def _init_state(opt: torch.optim.Optimizer) -> None:
    """Create a stock element-wise optimizer's state: one step with zero gradients, lr 0 and no
    weight decay, which leaves parameters and (zero) state as they were."""
    saved = [(g["lr"], g.get("weight_decay", 0.0)) for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for g, (lr, wd) in zip(opt.param_groups, saved, strict=True):
        g["lr"], g["weight_decay"] = lr, wd
        for p in g["params"]:
            p.grad = None


class PlainSGD:
    """``torch.optim.SGD``'s settings (``param_groups``) and state (momentum buffers, created
    as zeros up front), without a ``torch.optim.SGD``.

    Building any ``torch.optim.Optimizer`` imports torch's compiler stack (``torch._dynamo``,
    2-3 s on these machines): ``Optimizer.add_param_group``, called by the constructor, is
    wrapped in ``torch._disable_dynamo``, which imports ``torch._dynamo`` on its first call,
    and ``step`` does the same through ``_use_grad_for_differentiable``. The ``foreach`` and
    ``fused`` defaults play no part (``foreach=False`` imports it all the same). The fused SGD
    path reads only the settings and the buffers, so a run that takes it never imports the
    compiler; :meth:`materialize` builds the stock optimizer over the same state when needed.
    """

    #: The keyword arguments it takes besides ``lr`` (torch.optim.SGD's, less the
    #: implementation switches foreach/fused/differentiable).
    SETTINGS = frozenset({"momentum", "dampening", "weight_decay", "nesterov", "maximize"})

    def __init__(self, params: Sequence[Tensor], *, lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 maximize: bool = False) -> None:
        # torch.optim.SGD's own checks, so a bad setting fails here as it would there
        if not lr >= 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not momentum >= 0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self.param_groups: list[dict[str, Any]] = [{
            "params": list(params), "lr": lr, "momentum": momentum, "dampening": dampening,
            "weight_decay": weight_decay, "nesterov": nesterov, "maximize": maximize}]
        self.state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        if momentum:
            for p in self.param_groups[0]["params"]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)

    def materialize(self) -> torch.optim.SGD:
        """The stock ``torch.optim.SGD`` with these settings, sharing these state tensors."""
        g = self.param_groups[0]
        opt = torch.optim.SGD(g["params"], lr=g["lr"], momentum=g["momentum"],
                              dampening=g["dampening"], weight_decay=g["weight_decay"],
                              nesterov=g["nesterov"], maximize=g["maximize"])
        for p, state in self.state.items():
            opt.state[p].update(state)
        return opt


# ----------------------------------------------------------------------------- trainer


class LocalTrainer:
    """One local step of every stacked node: ``step(idx, active) -> per-node losses``.

    Args:
        model: the stacked models.
        x_train, y_train: the whole training set, on the model's device; a step gathers each
            node's batch with one index tensor [L, B].
        optimizer: a name :func:`make_optimizer` takes (``sgd``, ``adam``, ``RMSprop``, ...).
        lr, momentum, weight_decay: optimizer settings (weight_decay None = its default).
        extra: more optimizer keyword arguments (``--optimizer-args``).
        grad_clip: clip each node's gradient norm to this (None = off).

    SGD on a plain MLP (``impl="matmul"``) with a classification or regression loss and no
    clipping takes a fused path (:meth:`fused_applies`): forward and backward written out by
    hand, each weight updated in place by the same batched product that forms its gradient (no
    gradient tensors, no autograd graph), in chunks of rows small enough to stay in cache, and
    only on the active rows. It computes what ``torch.optim.SGD`` does (momentum, weight
    decay) up to float32 rounding; set ``trainer.fused = False`` to force the autograd path.
    """

    def __init__(self, model: StackedModel, x_train: Tensor, y_train: Tensor, *,
                 optimizer: str, lr: float, momentum: float = 0.0,
                 weight_decay: float | None = None, grad_clip: float | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.model = model
        self.x_train = x_train
        self.y_train = y_train
        self.grad_clip = grad_clip
        self.params = model.parameters
        self._opt = make_optimizer(optimizer, self.params, lr=lr, momentum=momentum,
                                   weight_decay=weight_decay, extra=extra)
        self.fused = True
        self._neg: dict[tuple[int, ...], Tensor] = {}
        self._scratch = Scratch()  # weight-update products
        self._chunk_cache: dict[tuple[int, int], int] = {}

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The inner optimizer. With SGD, the stock ``torch.optim.SGD`` is built on first use
        (the autograd path, or a caller asking for it) from :class:`PlainSGD`'s settings and
        state; the fused path never needs it (see :class:`PlainSGD` for why that matters)."""
        if isinstance(self._opt, PlainSGD):
            self._opt = self._opt.materialize()
        return self._opt

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state per parameter, in parameter order (momentum buffers, Adam's
        moments and per-row step counts), and its learning rates: a simulation's checkpoint."""
        return {"state": [{k: v.clone() if isinstance(v, Tensor) else v
                           for k, v in self._opt.state.get(p, {}).items()} for p in self.params],
                "lr": [g["lr"] for g in self._opt.param_groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, rates = state["state"], state["lr"]
        if len(saved) != len(self.params) or len(rates) != len(self._opt.param_groups):
            raise ValueError(f"optimizer state holds {len(saved)} parameters and {len(rates)} "
                             f"groups, this trainer has {len(self.params)} and "
                             f"{len(self._opt.param_groups)}")
        for p, entry in zip(self.params, saved, strict=True):
            current = self._opt.state[p]
            for key, value in entry.items():
                old = current.get(key)
                if isinstance(value, Tensor) and isinstance(old, Tensor) \
                        and old.shape == value.shape:
                    old.copy_(value)  # the tensor the optimizer (and a CUDA graph) holds
                elif isinstance(value, Tensor):
                    current[key] = value.to(p.device).clone()
                else:
                    current[key] = value
        for group, rate in zip(self._opt.param_groups, rates, strict=True):
            group["lr"] = rate

    def state_tensors(self) -> list[Tensor]:
        """Parameters, model buffers and every per-row optimizer state tensor."""
        out = self.model.state_tensors()
        for state in self._opt.state.values():
            out += [t for t in state.values() if isinstance(t, Tensor) and t.dim() >= 1]
        return out

    def step(self, idx: Tensor, active: Tensor | None = None, lr: Tensor | None = None
             ) -> Tensor:
        """Train every active row on its batch ``idx`` [L, B]; returns per-node losses [L]
        (detached; idle rows hold the loss they would have had, or 0 with the loop impl and
        the fused SGD path). ``lr`` [L] sets each row's learning rate (a schedule over each
        node's own steps); rows with different rates step in one optimizer step per rate, the
        other rows frozen."""
        if active is not None and bool(active.all()):
            active = None
        rates: list[float] = []
        if lr is not None:
            on = lr if active is None else lr[active.to(lr.device)]
            rates = sorted(set(on.tolist()))
            if len(rates) == 1:
                self._set_lr(rates[0])
        if self.fused and len(rates) <= 1 and self.fused_applies():
            return self._fused_step(idx, active)
        xb, yb = self.x_train[idx], self.y_train[idx]
        losses = self.model.node_losses(xb, yb, active)
        grads = torch.autograd.grad(losses.sum(), self.params, allow_unused=True)
        for p, g in zip(self.params, grads, strict=True):
            p.grad = torch.zeros_like(p) if g is None else g
        if self.grad_clip is not None:
            clip_rows_(self.params, self.grad_clip)
        with torch.no_grad():
            if len(rates) <= 1:
                with frozen_rows(self.state_tensors(), active):
                    self.optimizer.step()
            else:
                assert lr is not None
                for rate in rates:
                    rows = lr == rate
                    if active is not None:
                        rows &= active.to(rows.device)
                    self._set_lr(rate)
                    with frozen_rows(self.state_tensors(), rows):
                        self.optimizer.step()
        for p in self.params:
            p.grad = None
        return losses.detach()

    def _set_lr(self, rate: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = rate

    # --------------------------------------------------------------------- fused SGD path

    def fused_applies(self) -> bool:
        """Whether :meth:`step` takes the fused SGD path (see the class docstring)."""
        opt = self._opt
        if self.model.plan is None or type(opt) not in (torch.optim.SGD, PlainSGD) \
                or self.grad_clip is not None or len(opt.param_groups) != 1 \
                or self.model.task.data.kind not in ("classification", "regression") \
                or self.model.task.loss_fn is not None:
            return False
        g = opt.param_groups[0]
        kind = self.model.task.data.kind
        shapes_ok = self.x_train.dim() == 2 and self.y_train.dim() == (
            1 if kind == "classification" else 2)
        return shapes_ok and not (g["nesterov"] or g["dampening"] or g["maximize"]) \
            and all(p.dtype == torch.float32 for p in self.params)

    def _fused_step(self, idx: Tensor, active: Tensor | None) -> Tensor:
        group = self._opt.param_groups[0]
        hyper = (float(group["lr"]), float(group["momentum"]), float(group["weight_decay"]))
        params = self.model.params
        bufs: dict[str, Tensor] = {}
        if hyper[1]:  # SGD's first step sets buf = grad: the same as from a zero buffer
            for name, p in params.items():
                state = self._opt.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs[name] = state["momentum_buffer"]
        rows = self.model.rows
        losses = torch.zeros(rows, device=idx.device)
        cap = self._chunk_rows(idx.shape[1])
        with torch.no_grad():
            if active is None:
                bounds = even_bounds(rows, cap)
                for r0, r1 in pairwise(bounds):
                    sl = slice(r0, r1)
                    losses[sl] = self._fused_chunk(
                        {n: t[sl] for n, t in params.items()},
                        {n: t[sl] for n, t in bufs.items()}, idx[sl], hyper)
                return losses
            live = to_device(active.cpu().nonzero().flatten(), idx.device)
            bounds = even_bounds(len(live), cap)
            for r0, r1 in pairwise(bounds):
                sel = live[r0:r1]
                p_c = {n: t.index_select(0, sel) for n, t in params.items()}
                b_c = {n: t.index_select(0, sel) for n, t in bufs.items()}
                losses[sel] = self._fused_chunk(p_c, b_c, idx.index_select(0, sel), hyper)
                for n, t in p_c.items():
                    params[n].index_copy_(0, sel, t)
                for n, t in b_c.items():
                    bufs[n].index_copy_(0, sel, t)
        return losses

    def _chunk_rows(self, batch: int) -> int:
        """Rows per fused chunk: all on a GPU; on a CPU about 4 MiB of parameters and
        activations per torch thread, so a chunk's weights stay in cache from forward to update
        (measured on the digits MLP at N = 1000, us per node-step by rows per chunk: 1 thread
        25.0 / 21.6 / 20.0 / 20.6 / 22.5 at 16 / 32 / 64 / 128 / 256 rows; 2 threads 19.3 /
        14.0 / 12.1 / 11.9 / 18.0)."""
        if self.model.device.type != "cpu":
            return self.model.rows
        key = (batch, torch.get_num_threads())
        rows = self._chunk_cache.get(key)
        if rows is None:
            per_row = 4 * self.model.flat.numel
            per_row += 4 * batch * (self.x_train[0].numel() + 3 * self.model._width())
            budget = (4 << 20) * torch.get_num_threads()
            rows = self._chunk_cache[key] = max(4, min(self.model.rows, budget // per_row))
        return rows

    def _fused_chunk(self, params: dict[str, Tensor], bufs: dict[str, Tensor], idx: Tensor,
                     hyper: tuple[float, float, float]) -> Tensor:
        """Forward, loss, backward and SGD update of the rows in ``params`` (views or copies
        [C, ...]) on their batches ``idx`` [C, B]; returns their losses [C].

        Activations are kept feature-major, ``[C, features, B]``: every product then reads a
        weight ``[C, out, in]`` as stored (``W @ h``), which streams it from memory faster
        than the transposed view ``h @ W^T`` does, and its update ``W += g @ h^T`` writes it
        as stored."""
        plan = self.model.plan
        assert plan is not None
        x = self.x_train[idx]  # [C, B, in]
        y = self.y_train[idx]
        h = x.transpose(1, 2)
        saved: list[Tensor] = []  # saved[i]: the input of plan[i]; saved[i + 1]: its output
        for i, (op, w_name, b_name) in enumerate(plan):  # forward
            saved.append(h)
            if op == "linear":
                w = params[w_name]
                h = torch.bmm(w, h) if b_name is None else torch.baddbmm(
                    params[b_name].unsqueeze(2), w, h)
            else:  # in place on a linear layer's output: the backward needs ours only
                inplace = i > 0 and plan[i - 1][0] == "linear"
                if op == "relu":
                    h = h.relu_() if inplace else torch.relu(h)
                else:
                    h = h.tanh_() if inplace else torch.tanh(h)
        saved.append(h)
        loss, g = self._loss_and_grad(h, y)
        first = next(i for i, (op, _, _) in enumerate(plan) if op == "linear")
        for i in range(len(plan) - 1, first - 1, -1):  # backward, updating as it goes
            op, w_name, b_name = plan[i]
            if op == "relu":
                g = torch.ops.aten.threshold_backward(g, saved[i + 1], 0)
            elif op == "tanh":
                g = torch.ops.aten.tanh_backward(g, saved[i + 1])
            else:
                assert w_name is not None
                w = params[w_name]
                below = torch.bmm(w.transpose(1, 2), g) if i > first else None  # old w
                _sgd_(w, bufs.get(w_name), hyper, g, saved[i].transpose(1, 2),
                      scratch=self._scratch.like(w))
                if b_name is not None:
                    _sgd_(params[b_name], bufs.get(b_name), hyper, grad=g.sum(dim=2))
                if below is not None:
                    g = below
        return loss

    def _loss_and_grad(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row mean loss [C] and its gradient with respect to ``out`` [C, K, B]."""
        c, b = out.shape[0], out.shape[2]
        if self.model.task.data.kind == "regression":
            diff = out - y.transpose(1, 2)
            loss = diff.square().reshape(c, -1).mean(dim=1)
            return loss, diff.mul_(2.0 / diff[0].numel())
        target = y.reshape(c, 1, b)
        logp = torch.log_softmax(out, dim=1)
        loss = -logp.gather(1, target).reshape(c, b).mean(dim=1)
        g = logp.exp_()
        neg = self._neg.get((c, b))
        if neg is None or neg.device != g.device:
            neg = self._neg[(c, b)] = torch.full((c, 1, b), -1.0, device=g.device)
        return loss, g.scatter_add_(1, target, neg).mul_(1.0 / b)


def _sgd_(p: Tensor, buf: Tensor | None, hyper: tuple[float, float, float],
          g_t: Tensor | None = None, a: Tensor | None = None, *, grad: Tensor | None = None,
          scratch: Tensor | None = None) -> None:
    """``torch.optim.SGD``'s update of ``p`` in place, the gradient given as ``grad`` or as
    the batched product ``g_t @ a`` (fused into the update)."""
    lr, momentum, wd = hyper
    if buf is None:  # p <- p - lr (grad + wd p)
        if grad is None and not p.is_contiguous() and p.device.type == "cpu":
            # on a CPU, torch's in-place baddbmm_ on a strided self (a chunk of the flat [L, P]
            # buffer) loops over the batch one addmm at a time: form the product with one
            # batched GEMM into a contiguous scratch instead (cuBLAS takes the strided self
            # as it is)
            grad = torch.bmm(g_t, a, out=scratch) if scratch is not None else g_t @ a
        if grad is None:
            p.baddbmm_(g_t, a, beta=1.0 - lr * wd, alpha=-lr)
        else:
            if wd:
                p.mul_(1.0 - lr * wd)
            p.add_(grad, alpha=-lr)
        return
    # buf <- momentum buf + grad + wd p;  p <- p - lr buf
    if grad is None:
        buf.baddbmm_(g_t, a, beta=momentum)
    else:
        buf.mul_(momentum).add_(grad)
    if wd:
        buf.add_(p, alpha=wd)
    p.add_(buf, alpha=-lr)


def even_bounds(rows: int, cap: int) -> list[int]:
    """Where ``rows`` rows split into as few chunks of at most ``cap`` as can be, their sizes
    differing by at most one: ``[0, ..., rows]``. 100 rows under a cap of 62 go as 50 + 50,
    not 62 + 38, whose first chunk outgrows the cache the cap was sized for (the digits MLP's
    local step at N = 100 takes ~8 % less time)."""
    pieces = -(-rows // cap)  # (no rows: no chunk)
    return [rows * k // pieces for k in range(pieces + 1)] if pieces else [0]


def clip_rows_(params: Sequence[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` applied to every row (node) separately; returns the
    per-row total norms [L]."""
    sq = None
    for p in params:
        assert p.grad is not None
        s = p.grad.detach().float().pow(2).reshape(p.shape[0], -1).sum(dim=1)
        sq = s if sq is None else sq + s
    assert sq is not None
    norms = sq.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        assert p.grad is not None
        p.grad.mul_(coef.to(p.grad.dtype).view((p.shape[0],) + (1,) * (p.dim() - 1)))
    return norms


def steps_for_epochs(sizes: Tensor, batch_size: int, epochs: int) -> Tensor:
    """Inner steps that ``epochs`` epochs take for shards of ``sizes`` [N] samples."""
    return epochs * ((sizes + batch_size - 1) // batch_size)
