"""Merging rules on named tensors (pure math, no task, no files): soups, Fisher weights,
checkpoint averages, TIES and DARE. A model is a ``State``: ``{name: tensor}``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["CHECKPOINT_METHODS", "SOUP_METHODS", "State", "average", "check_states", "dare",
           "dare_masks", "ema", "fisher_average", "greedy_soup", "last_k", "lawa", "positive",
           "ties"]

State = dict[str, Tensor]
SOUP_METHODS = ("uniform", "greedy-soup", "fisher", "ties", "dare")
CHECKPOINT_METHODS = ("last-k", "ema", "lawa")



def check_states(states: Sequence[Mapping[str, Tensor]]) -> None:
    """Every model has the same tensor names, shapes and dtypes (a merge of a bf16 checkpoint
    with an fp32 one would otherwise come out in whichever dtype model 0 has: cast first)."""
    if not states:
        raise ValueError("no models to merge (empty list)")
    first = states[0]
    for i, s in enumerate(states[1:], start=1):
        if set(s) != set(first):
            diff = sorted(set(s) ^ set(first))
            raise ValueError(f"model {i} has other tensors than model 0: {diff[:5]}")
        for name, t in s.items():
            if t.shape != first[name].shape:
                raise ValueError(f"tensor {name!r} is {list(t.shape)} in model {i} but "
                                 f"{list(first[name].shape)} in model 0")
            if t.dtype != first[name].dtype:
                raise ValueError(f"tensor {name!r} is {t.dtype} in model {i} but "
                                 f"{first[name].dtype} in model 0: cast the models to one "
                                 "dtype before merging")


def average(states: Sequence[Mapping[str, Tensor]],
            weights: Sequence[float] | Tensor | None = None) -> State:
    """The (weighted) mean of each floating tensor; integer tensors come from model 0."""
    check_states(states)
    n = len(states)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else \
        torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (n,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) \
            or float(w.sum()) <= 0:
        raise ValueError(f"weights={w.tolist()} is invalid: expected {n} finite numbers >= 0 "
                         "with a positive sum")
    w = w / w.sum()
    out: State = {}
    for name, t0 in states[0].items():
        if not t0.is_floating_point():
            out[name] = t0.clone()
            continue
        acc = torch.zeros(t0.shape, dtype=torch.float64)
        for wi, s in zip(w, states, strict=True):
            acc += wi * s[name].double()
        out[name] = acc.to(t0.dtype)
    return out


def fisher_average(states: Sequence[Mapping[str, Tensor]],
                   fishers: Sequence[Mapping[str, Tensor]], eps: float = 1e-8) -> State:
    """``sum_i (F_i + eps) theta_i / sum_i (F_i + eps)`` per coordinate of every tensor that has
    a Fisher; other tensors (buffers) are averaged uniformly."""
    check_states(states)
    if len(fishers) != len(states):
        raise ValueError(f"{len(fishers)} Fishers for {len(states)} models")
    if not eps >= 0:
        raise ValueError(f"eps={eps!r} is invalid: expected a number >= 0")
    for i, f in enumerate(fishers):
        if set(f) != set(fishers[0]) or not set(f) <= set(states[0]):
            extra = sorted((set(f) ^ set(fishers[0])) | (set(f) - set(states[0])))
            raise ValueError(f"Fisher {i} has tensors {extra[:5]} that the models (or "
                             "Fisher 0) lack")
        for name, fi in f.items():
            if fi.shape != states[0][name].shape:
                raise ValueError(f"Fisher {i} of tensor {name!r} is {list(fi.shape)}, the "
                                 f"tensor is {list(states[0][name].shape)}")
            if not bool(torch.isfinite(fi).all()) or bool((fi < 0).any()):
                raise ValueError(f"Fisher {i} of tensor {name!r} has a negative or non-finite "
                                 "entry: a diagonal Fisher is finite and >= 0")
    out = average(states)
    for name in fishers[0]:
        num = torch.zeros(states[0][name].shape, dtype=torch.float64)
        den = torch.zeros_like(num)
        for s, f in zip(states, fishers, strict=True):
            fi = f[name].double() + eps
            num += fi * s[name].double()
            den += fi
        # where every Fisher (and eps) is 0 the plain mean stands
        out[name] = torch.where(den > 0, num / den.clamp_min(1e-300),
                                out[name].double()).to(states[0][name].dtype)
    return out


def last_k(states: Sequence[Mapping[str, Tensor]], k: int) -> State:
    """The mean of the last ``k`` models (checkpoints oldest first)."""
    k = positive("k", k)
    if k > len(states):
        raise ValueError(f"k={k} is invalid: only {len(states)} checkpoints")
    return average(states[-k:])


def lawa(states: Sequence[Mapping[str, Tensor]], k: int, every: int = 1) -> State:
    """The mean of the ``k`` latest checkpoints spaced ``every`` checkpoints apart, counting
    back from the latest (``every=1`` is :func:`last_k`)."""
    k, every = positive("k", k), positive("every", every)
    need = (k - 1) * every + 1
    if need > len(states):
        raise ValueError(f"k={k} with every={every} needs {need} checkpoints, got {len(states)}")
    picked = [states[len(states) - 1 - j * every] for j in range(k)]
    return average(picked[::-1])


def ema(states: Sequence[Mapping[str, Tensor]], decay: float) -> State:
    """``e_1 = theta_1``, ``e_t = decay e_{t-1} + (1 - decay) theta_t`` over the checkpoints
    (oldest first); returns ``e_T``."""
    check_states(states)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay={decay!r} is invalid: expected a number in [0, 1)")
    acc = {n: t.double().clone() for n, t in states[0].items() if t.is_floating_point()}
    for s in states[1:]:
        for n in acc:
            acc[n].mul_(decay).add_(s[n].double(), alpha=1.0 - decay)
    last = states[-1]
    return {n: acc[n].to(t.dtype) if n in acc else t.clone() for n, t in last.items()}


def _float_names(state: Mapping[str, Tensor], names: Sequence[str] | None) -> list[str]:
    keys = list(state) if names is None else list(names)
    missing = [n for n in keys if n not in state]
    if missing:
        raise ValueError(f"names={missing[:5]} are not tensors of the models")
    return [n for n in keys if state[n].is_floating_point()]


def _check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or \
            not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} is invalid: expected a finite number")


def _flatten(states: Sequence[Mapping[str, Tensor]], names: Sequence[str]) -> Tensor:
    return torch.stack([torch.cat([s[n].double().reshape(-1) for n in names]) for s in states])


def _unflatten(vector: Tensor, like: Mapping[str, Tensor], names: Sequence[str]) -> State:
    out, offset = {}, 0
    for n in names:
        t = like[n]
        out[n] = vector[offset:offset + t.numel()].reshape(t.shape).to(t.dtype)
        offset += t.numel()
    return out


def ties(base: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]], *,
         density: float = 0.2, scale: float = 1.0, names: Sequence[str] | None = None) -> State:
    """TIES-merging of ``states`` against ``base`` over the tensors ``names`` (default: every
    floating tensor); other tensors are averaged uniformly.

    1. trim: each task vector ``tau_i = theta_i - base`` (all its tensors flattened into one)
       keeps its ``round(density * P)`` largest magnitudes, the rest become 0;
    2. elect: ``sign(sum_i trimmed_i)`` per coordinate (a 0 sum takes the sign of the sum of
       all elected signs, as the authors' code does);
    3. disjoint mean: the mean of the trimmed values whose sign is the elected one (0 where
       none is);
    4. ``base + scale * merged``.
    """
    check_states([base, *states])
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density!r} is invalid: expected a number in (0, 1]")
    _check_scale(scale)
    keys = _float_names(base, names)
    tau = _flatten(states, keys) - _flatten([base], keys)
    p = tau.shape[1]
    keep = max(1, round(density * p))
    if keep < p:
        idx = tau.abs().topk(keep, dim=1).indices
        mask = torch.zeros_like(tau, dtype=torch.bool).scatter_(1, idx, True)
        tau = tau * mask
    elected = torch.sign(tau.sum(dim=0))
    majority = 1.0 if float(elected.sum()) >= 0 else -1.0
    elected = torch.where(elected == 0, torch.full_like(elected, majority), elected)
    agree = (torch.sign(tau) == elected) & (tau != 0)
    merged = (tau * agree).sum(dim=0) / agree.sum(dim=0).clamp_min(1)
    out = average(states)
    base_vec = _flatten([base], keys)[0]
    out.update(_unflatten(base_vec + scale * merged, base, keys))
    return out


def dare_masks(n: int, size: int, drop: float, seed: int) -> Tensor:
    """``[n, size]`` keep-masks of DARE: each coordinate kept with probability ``1 - drop``."""
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop={drop!r} is invalid: expected a number in [0, 1)")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand(n, size, generator=gen, dtype=torch.float64) >= drop


def dare(base: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]], *,
         drop: float = 0.9, scale: float = 1.0, seed: int = 0,
         names: Sequence[str] | None = None) -> State:
    """DARE against ``base`` over the tensors ``names`` (default: every floating tensor):
    ``base + scale * mean_i(mask_i * tau_i / (1 - drop))`` with the masks of
    :func:`dare_masks` (seeded); other tensors are averaged uniformly."""
    check_states([base, *states])
    _check_scale(scale)
    keys = _float_names(base, names)
    base_vec = _flatten([base], keys)
    tau = _flatten(states, keys) - base_vec
    masks = dare_masks(len(states), tau.shape[1], drop, seed)
    merged = (tau * masks / (1.0 - drop)).mean(dim=0)
    out = average(states)
    out.update(_unflatten(base_vec[0] + scale * merged, base, keys))
    return out


def greedy_soup(states: Sequence[Mapping[str, Tensor]], score: Callable[[State], float],
                ) -> tuple[State, list[int]]:
    """Wortsman et al.'s greedy soup: models sorted by ``score`` (higher is better, on held-out
    data), each added when the soup's score does not drop. Returns the soup and the indices of
    its ingredients (in the order they were added). A NaN score (a diverged model) ranks
    below every other, and a soup that scores NaN is not taken."""
    check_states(states)
    scores = [score(dict(s)) for s in states]
    scores = [-math.inf if math.isnan(v) else v for v in scores]
    order = sorted(range(len(states)), key=lambda i: -scores[i])
    chosen = [order[0]]
    best = scores[order[0]]
    soup: State = dict(states[order[0]])
    for i in order[1:]:
        candidate = average([states[j] for j in [*chosen, i]])
        s = score(candidate)
        if s >= best:
            chosen.append(i)
            best, soup = s, candidate
    return soup, chosen


def positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 1")
    return value

