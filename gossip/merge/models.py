"""A merged state as a task's model: loading it, recomputing BatchNorm statistics, and the
diagonal Fisher used by Fisher-weighted averaging."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gossip.merge.soups import State
from gossip.tasks import Task

__all__ = ["diagonal_fisher", "has_running_stats", "recompute_bn", "state_of", "to_model"]



def to_model(task: Task, state: Mapping[str, Tensor], *, seed: int = 0) -> nn.Module:
    """``task``'s model with ``state`` (parameters and buffers by name) copied in.

    Frozen parameters (``requires_grad=False``) that ``state`` lacks keep the values of the
    task's model at ``seed``: a simulation saves only what it trains, and every simulated node
    ran with the frozen parameters of that model."""
    model = task.make_model(seed)
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    missing = sorted(n for n, p in model.named_parameters() if n not in state and p.requires_grad)
    if missing:
        raise ValueError(f"the models lack parameters {missing[:5]} of task {task.name!r}")
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"the models hold tensors {unknown[:5]} that task {task.name!r}'s "
                         "model does not have")
    with torch.no_grad():
        for name, t in state.items():
            if own[name].shape != t.shape:
                raise ValueError(f"tensor {name!r} is {list(t.shape)} but task {task.name!r}'s "
                                 f"model has {list(own[name].shape)}")
            own[name].copy_(t)
    model.eval()
    return model


def state_of(model: nn.Module) -> State:
    """Parameters and buffers of ``model`` by name (detached copies)."""
    return {n: t.detach().clone() for n, t in
            [*model.named_parameters(), *model.named_buffers()]}


def has_running_stats(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for m in model.modules())


@torch.no_grad()
def recompute_bn(model: nn.Module, x: Tensor, *, batch_size: int, batches: int,
                 seed: int = 0) -> nn.Module:
    """Reset every BatchNorm's running statistics and recompute them as the cumulative average
    (torch's ``momentum=None``) over ``batches`` batches of ``batch_size`` rows of ``x`` drawn
    without replacement (seeded). Leaves ``model`` in eval mode."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model.eval()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for b in range(batches):
            rows = order[b * batch_size:(b + 1) * batch_size]
            if len(rows) < 2:
                break
            model(x[rows])
    finally:
        for m, mom in zip(norms, saved, strict=True):
            m.momentum = mom
    return model.eval()


def diagonal_fisher(task: Task, model: nn.Module, x: Tensor, *, seed: int = 0,
                    chunk: int = 64) -> State:
    """The diagonal Fisher of ``model``'s trainable parameters, averaged over the inputs ``x``.

    Classification: ``mean_x sum_c p(c|x) g_c(x)^2`` with ``g_c = d log p(c|x) / d theta``
    (exact over the classes). Language models: labels sampled from the model at every position
    (seeded), ``g`` the gradient of the sequence's log-likelihood. Regression: ``y ~ N(f(x), 1)``
    sampled, ``g = d log N(y; f(x), 1) / d theta``.
    """
    kind = task.data.kind
    model.eval()
    # frozen parameters (requires_grad=False) are not merged by their Fisher: constants here
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    buffers.update({n: p.detach() for n, p in model.named_parameters() if not p.requires_grad})
    gen = torch.Generator().manual_seed(int(seed))

    def log_lik(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))[0]
        if kind == "regression":
            return -0.5 * ((out - yi) ** 2).sum()
        return torch.log_softmax(out, dim=-1).gather(-1, yi.unsqueeze(-1)).sum()

    per_example = vmap(grad(log_lik), in_dims=(None, 0, 0))
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for s in range(0, len(x), chunk):
        xs = x[s:s + chunk]
        with torch.no_grad():
            out = model(xs)
        if kind == "classification":
            probs = torch.softmax(out.double(), dim=-1)
            classes = probs.shape[-1]
            xr = xs.repeat_interleave(classes, dim=0)
            yr = torch.arange(classes).repeat(len(xs))
            w = probs.reshape(-1)
        elif kind == "lm":
            probs = torch.softmax(out.double(), dim=-1)
            yr = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen)
            xr, yr, w = xs, yr.reshape(out.shape[:-1]), torch.ones(len(xs), dtype=torch.float64)
        else:
            noise = torch.randn(out.shape, generator=gen, dtype=out.dtype)
            xr, yr, w = xs, out + noise, torch.ones(len(xs), dtype=torch.float64)
        grads = per_example(params, xr, yr)
        for n, g in grads.items():
            total[n] += torch.einsum("b,b...->...", w, g.double() ** 2)
    return {n: (t / len(x)).to(params[n].dtype) for n, t in total.items()}


