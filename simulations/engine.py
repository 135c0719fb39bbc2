"""The simulator: N virtual nodes stacked in one process (or a shard of them per Ray actor).

:class:`Simulation` builds the rows of its nodes (all N, or the global ids it is given), the
:class:`gossip.comm.StackedCommunicator` that joins them, and the very algorithm object a real
rank runs (``gossip.algorithms.build_algorithm``). A round is one synchronisation period:

1. faults for the round: who is up (``comm.set_faults``), who straggles;
2. up to H vectorized local steps (:mod:`simulations.training`); a node that is down, not
   sampled (FedAvg client sampling), out of its local epoch or past its straggler deadline is
   masked on that step;
3. ``algorithm.step(step, active=up)``, once; the rows of nodes that are down are restored
   afterwards with their algorithm state, so a down node is frozen whatever the algorithm does;
4. the communication events of the sync are turned into simulated seconds
   (:mod:`simulations.network`); bytes come from ``comm.bytes_per_node``;
5. metrics: train loss, test metrics (:mod:`simulations.evaluate`: the global model once, or
   a seeded sample of nodes in one vectorized forward), consensus distance, bytes, simulated
   and wall seconds.

Records follow the one schema of :mod:`gossip.records`: a round gives the ``eval`` rows of its
evaluated nodes (if evaluated) and one ``round`` record of figures over all nodes.
Everything random derives from ``(seed, global node id)`` or ``(seed, round)``, so results do
not depend on how the nodes are sharded. A shard's :meth:`Simulation.run_round` reduces its
metrics over the process group, so every shard returns the same global record.

:func:`drive` runs every round of a runner (a :class:`Simulation`, or the Ray driver of
:mod:`simulations.ray_backend`) and writes the run directory; :func:`simulations.run.run` picks
the runner.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from gossip import checkpoint as ckpt
from gossip.algorithms import same_init
from gossip.algorithms._common import frozen_rows
from gossip.batching import StackedBatches
from gossip.comm.stacked import StackedCommunicator
from gossip.data import label_distribution
from gossip.flat import persistent_buffers, scope_from_spec
from gossip.metrics import NO_SPACE, RunWriter, iter_jsonl, truncate_jsonl
from gossip.ops import to_device
from gossip.records import Summarizer, eval_rows
from gossip.run import build
from gossip.run.schedule import lr_factors
from gossip.run.spec import optimizer_kwargs
from gossip.rundir import RunDir
from gossip.tasks import Task
from gossip.topology import Topology, spectral_gap
from simulations.config import SimConfig
from simulations.evaluate import eval_sample, evaluate_rows
from simulations.faults import FaultSchedule
from simulations.graphs import Graphs
from simulations.memory import check_fits, simulation_estimate
from simulations.network import NetworkModel, SimClock
from simulations.threads import auto_threads
from simulations.training import LocalTrainer, StackedModel, choose_impl, steps_for_epochs

__all__ = ["RunRecorder", "Runner", "Simulation", "describe", "drive", "set_threads"]

log = logging.getLogger(__name__)

#: Rows per chunk when reducing over the stacked parameters (bounds float64 temporaries).
_ROW_CHUNK = 256


def _runnable_impl(model: nn.Module, impl: str, x: Tensor) -> str:
    """``impl`` (``SimConfig.train_impl``), or ``"loop"`` where ``"auto"`` would pick ``vmap`` for
    a model that does not run under ``torch.vmap`` (``.item()``, data-dependent control flow):
    one forward of one stacked copy on ``x`` (batched, as in training), without gradients and
    on a forked RNG. It failed
    at the first training step, after the run directory was written, with vmap's own error;
    an explicit ``vmap`` is refused naming the problem and the way out."""
    if choose_impl(model, impl) != "vmap":
        return impl
    params = {n: p.detach().unsqueeze(0) for n, p in model.named_parameters()}
    buffers = {n: b.unsqueeze(0) for n, b in model.named_buffers()}

    def call(p: dict[str, Tensor], b: dict[str, Tensor], inp: Tensor) -> Tensor:
        return functional_call(model, (p, b), (inp,))

    try:
        with torch.no_grad(), torch.random.fork_rng(
                devices=[x.device] if x.device.type == "cuda" else []):
            torch.vmap(call, randomness="different")(params, buffers, x.unsqueeze(0))
    except Exception as e:  # whatever the model raises under vmap
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        if impl == "vmap":
            raise ValueError(f"train_impl='vmap' cannot run this model under torch.vmap "
                             f"({problem}); use train_impl='loop' (--train-impl loop), which "
                             "runs the nodes one by one") from None
        log.warning("the model does not run under torch.vmap (%s): training the nodes one by "
                    "one (train_impl='loop')", problem)
        return "loop"
    return impl


class Simulation:
    """The nodes ``nodes`` (global ids; default all ``cfg.nodes``) of one simulated run.

    Args:
        cfg: the run's configuration (resolved here for the task).
        nodes: global ids of the rows this process holds (a Ray shard), or None for all.
        group: a process group joining the shards (required when ``nodes`` is a subset).
        task: a prebuilt task (default: ``get_task(cfg.task, seed=cfg.seed)``).
    """

    def __init__(self, cfg: SimConfig, nodes: Sequence[int] | Tensor | None = None,
                 group: dist.ProcessGroup | None = None, *, task: Task | None = None) -> None:
        t_start = time.perf_counter()
        if cfg.device == "cuda" and not torch.cuda.is_available():  # here: a Ray actor may have one
            raise ValueError("device='cuda' needs CUDA, which is not available to this process "
                             f"(torch {torch.__version__}, a CPU build?); use device='cpu'")
        task = build.with_init(task, cfg.init) if task is not None \
            else build.load_task(cfg.task, seed=cfg.seed, init=cfg.init)
        # every node's batch is gathered from one tensor: a Dataset is read into memory once
        self.task = dataclasses.replace(task, data=task.data.to_tensors())
        if cfg.eval_samples is not None and cfg.eval_samples > self.task.data.num_test:
            raise ValueError(f"eval_samples={cfg.eval_samples} is invalid: expected at most "
                             f"the {self.task.data.num_test} test samples of "
                             f"task={self.task.name!r} (or None: all of them)")
        self.cfg = cfg = cfg.resolved(self.task)
        n = cfg.nodes
        check_fits(simulation_estimate(cfg, self.task, n if nodes is None else len(nodes)),
                   device=cfg.device)  # before anything proportional to N is allocated
        ids = torch.arange(n) if nodes is None else torch.as_tensor(nodes, dtype=torch.long)
        if ids.dim() != 1 or ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= n \
                or ids.unique().numel() != ids.numel():
            raise ValueError(f"nodes must be distinct ids in [0, {n}), got {ids.tolist()[:8]}...")
        if group is None and ids.numel() != n:
            raise ValueError(f"nodes holds {ids.numel()} of {n} nodes: a shard needs a group")
        self.nodes = ids
        self.group = group
        # torch's global RNG draws the models' own randomness (dropout masks, also under vmap's
        # randomness="different"): seeded from the run's seed and this shard's first node, as
        # launch.train seeds each rank, so a run with dropout repeats itself
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, int(ids[0]), 1])
                              .generate_state(1)[0]))
        self.device = torch.device(cfg.device)
        data = self.task.data
        # a loss_fn that returns no mean loss, refused before anything proportional to N
        probe = self.task.make_model(cfg.seed).to(self.device)
        build.check_loss(self.task, probe, data.x_test, data.y_test, cfg.batch_size or 1)
        impl = _runnable_impl(probe, cfg.train_impl, data.x_test[:2].to(self.device))
        bsz = cfg.batch_size
        assert bsz is not None
        self.shards = shards = build.make_shards(cfg, self.task, n, shard_size=cfg.shard_size)
        self.sizes = torch.tensor([len(s) for s in shards], dtype=torch.long)
        # streaming fragments: a round is H / F steps and syncs one fragment
        frags = cfg.fragments or 1
        if cfg.local_epochs is None:
            assert cfg.sync_every is not None
            if cfg.sync_every % frags:
                raise ValueError(f"fragments={frags} must divide sync_every={cfg.sync_every} in "
                                 "the simulator (one fragment syncs per round)")
            self.round_steps = torch.full((n,), cfg.sync_every // frags, dtype=torch.long)
        elif frags > 1:
            raise ValueError(f"fragments={frags} needs rounds of sync_every steps, not "
                             f"local_epochs={cfg.local_epochs}")
        else:
            self.round_steps = steps_for_epochs(self.sizes, bsz, cfg.local_epochs)
        self.steps_per_round = int(self.round_steps.max())
        local = ids.tolist()
        self.batches = StackedBatches([shards[i] for i in local], local, bsz, seed=cfg.seed,
                                      device=self.device)
        self.local_step = torch.zeros(len(local), dtype=torch.long)

        self.model = StackedModel(self.task, local, seed=cfg.seed, same_init=same_init(cfg.algo),
                                  device=self.device, impl=impl,
                                  scope=scope_from_spec(cfg.vc_scope or "weights"))
        self.trainer = LocalTrainer(
            self.model, data.x_train.to(self.device), data.y_train.to(self.device),
            optimizer=cfg.optimizer or "sgd", lr=cfg.lr or 0.0, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
            extra=optimizer_kwargs(cfg.optimizer_args))
        self.graphs = Graphs(self.batches, self.trainer, self.device)  # GPU: replayed work
        self.graphs.enabled &= cfg.cuda_graphs
        self.total_steps = cfg.rounds * self.steps_per_round
        if cfg.warmup_steps and cfg.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps={cfg.warmup_steps} is invalid: expected fewer than "
                             f"the run's {self.total_steps} local steps ({cfg.rounds} rounds of "
                             f"{self.steps_per_round}; the warm-up would never end)")
        self.comm = StackedCommunicator(n, ids, group=group, seed=cfg.seed)
        self.topology: Topology | None = build.make_topology_for(cfg, n)
        self.algorithm, _ = build.make_algorithm(
            cfg, self.model.flat, self.comm, topology=self.topology,
            weight=self.sizes[ids].to(torch.float64), sync_every=self.steps_per_round * frags)
        #: every row holds the same whole model after a sync (FedAvg; DiLoCo without fragments).
        #: Not with floating-point persistent buffers (BatchNorm's running statistics): the
        #: algorithms average the parameters only, so each node's statistics are its own and
        #: one row cannot stand for every node
        self.one_model = bool(getattr(self.algorithm, "one_model", False)) and not any(
            b.is_floating_point() for b in persistent_buffers(self.model.base).values())
        self.faults = FaultSchedule(
            n, cfg.rounds, seed=cfg.seed, crash_fraction=cfg.crash_fraction,
            crash_round=cfg.crash_round or 0, churn_fraction=cfg.churn_fraction,
            churn_rounds=cfg.churn_rounds, straggler_fraction=cfg.straggler_fraction,
            straggler_slowdown=cfg.straggler_slowdown, drop_prob=cfg.drop_prob)
        self.clock = SimClock(NetworkModel(
            latency=cfg.latency, bandwidth=cfg.bandwidth, jitter=cfg.jitter,
            compute_time=cfg.compute_time, allreduce=cfg.allreduce,
            server_bandwidth=cfg.server_bandwidth, seed=cfg.seed), n)
        k = cfg.eval_samples or data.num_test
        self.x_test = data.x_test[:k].to(self.device)
        self.y_test = data.y_test[:k].to(self.device)
        self.build_seconds = time.perf_counter() - t_start

    # --------------------------------------------------------------------- description

    def info(self) -> dict[str, Any]:
        """Static facts of the run (the same on every shard)."""
        flat = self.model.flat
        out: dict[str, Any] = {
            "task": self.task.name,
            "task_source": build.task_source(self.cfg.task),
            "steps_per_round": self.steps_per_round,
            "params_per_node": flat.numel,
            "model_bytes": flat.nbytes_per_row,
            "train_impl": self.model.impl,
            "shard_size_min": int(self.sizes.min()),
            "shard_size_max": int(self.sizes.max()),
            "build_seconds": self.build_seconds,
        }
        if self.topology is not None and not self.topology.time_varying \
                and self.cfg.nodes <= 1024:
            out["spectral_gap"] = spectral_gap(self.topology.mixing_matrix(0))
        return out

    def label_counts(self) -> np.ndarray | None:
        """[N, classes] per-node label counts (classification tasks), else None."""
        data = self.task.data
        if data.kind != "classification" or data.num_classes is None:
            return None
        return label_distribution(data.y_train, self.shards, data.num_classes)

    def state_dict(self) -> dict[str, Any]:
        """Everything the next rounds depend on, for a checkpoint to continue bit for bit
        (:mod:`simulations.checkpoint`): the models' rows and buffers, the optimizer's and the
        algorithm's state, each node's local step, the communicator's counters and drop
        generator, the simulated clocks and the torch RNG. The rest (faults, batches, sampling,
        pairings, compression seeds) derives from the seed, the round and the step."""
        return {
            "params": ckpt.params_state(self.model.flat),
            "optimizer": self.trainer.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "data": {"local_step": self.local_step.clone()},
            "rng": ckpt.capture_rng(self.device),
            "engine": {"buffers": {n: b.detach().clone() for n, b in self.model.buffers.items()},
                       "comm": self.comm.state_dict(), "clock": self.clock.state_dict()},
        }

    def load_state_dict(self, state: dict[str, Any], *, source: str = "checkpoint") -> None:
        """Continue from :meth:`state_dict` (ValueError naming ``source`` if it does not fit)."""
        try:
            self._load_state(state, source)
        except (KeyError, RuntimeError, TypeError) as e:  # the algorithm's own: ValueError
            what = f"it holds no {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{source} does not fit this run ({what})") from e

    def _load_state(self, state: dict[str, Any], source: str) -> None:
        ckpt.restore_params(self.model.flat, state["params"], source=source)
        self.trainer.load_state_dict(state["optimizer"])
        self.algorithm.load_state_dict(state["algorithm"])
        steps = state["data"]["local_step"]
        if steps.shape != self.local_step.shape:
            raise ValueError(f"{source} holds {len(steps)} nodes' steps, this run has "
                             f"{len(self.local_step)}")
        self.local_step = steps.to(torch.long).clone()
        engine = state["engine"]
        if set(engine["buffers"]) != set(self.model.buffers):
            raise ValueError(f"{source} holds model buffers {sorted(engine['buffers'])}, the "
                             f"model has {sorted(self.model.buffers)}")
        with torch.no_grad():
            for name, buf in engine["buffers"].items():
                self.model.buffers[name].copy_(buf)
        self.comm.load_state_dict(engine["comm"])
        self.clock.load_state_dict(engine["clock"])
        ckpt.restore_rng(state["rng"], self.device)

    def flat_params(self) -> Tensor:
        """The local rows' parameters as one [L, P] tensor (a copy)."""
        return torch.cat([b.detach() for b in self.model.flat.buffers()], dim=1)

    def save_models(self, out: str | Path) -> Path:
        """Write the nodes' current models to ``out``/models.pt + models.json (the index that
        :mod:`gossip.merge` reads); returns the index path."""
        from gossip import merge

        cfg = self.cfg
        return merge.save_stacked(
            out, {n: p.detach() for n, p in self.model.params.items()}, self.model.buffers,
            nodes=self.nodes.tolist(), task=cfg.task, seed=cfg.seed, init=self.task.init,
            info={"algo": cfg.algo, "rounds": cfg.rounds, "nodes_total": cfg.nodes,
                  "config": cfg.to_dict()})

    # --------------------------------------------------------------------- one round

    def run_round(self, r: int) -> dict[str, Any]:
        """Run round ``r`` (0-based): local steps, one sync, time and metrics (global): the
        ``round`` record, holding an evaluated round's ``eval`` rows under ``"eval_rows"``
        (:class:`RunRecorder` writes them before the round record)."""
        return self.start_round(r)()

    def start_round(self, r: int) -> Callable[[], dict[str, Any]]:
        """Round ``r`` up to its figures: returns what gives its record (:meth:`run_round`).

        On a GPU the round's work is queued and its figures that live on the device (the
        train loss, the evaluation) are copied to the host without waiting; the record waits
        for that copy alone. :func:`drive` starts round ``r + 1`` before it asks for round
        ``r``'s record, so the host queues the next round while the device runs this one.
        Everything else the record holds is taken here, before the next round can change it.
        """
        cfg = self.cfg
        alive = self.faults.alive(r)
        slow = self.faults.slowdown(r)
        self.comm.set_faults(alive, cfg.drop_prob)
        take = alive.clone()
        sampled = self.algorithm.sampled(r)
        if sampled is not None:  # FedAvg client sampling: unsampled clients stay idle
            take &= sampled
        steps = self.round_steps * take
        if cfg.straggler_policy == "deadline":
            steps = torch.floor(steps / slow).to(torch.long)
        local_steps = steps[self.nodes]

        # masks are decided on the host; the device gets copies it need not wait for
        loss_sum = torch.zeros(len(self.nodes), dtype=torch.float64, device=self.device)
        on_device = to_device(local_steps, self.device)
        for s in range(int(local_steps.max()) if len(local_steps) else 0):
            act = local_steps > s
            everyone = bool(act.all())
            lr = None
            if cfg.schedule != "constant":  # each node at its own step of the schedule
                assert cfg.lr is not None
                lr = cfg.lr * lr_factors(cfg.schedule, self.local_step, self.total_steps,
                                         cfg.warmup_steps)
            losses = self.graphs.step(self.local_step) if everyone and lr is None else None
            if losses is None:
                rows = None if everyone else act
                losses = self.trainer.step(self.batches.batch(self.local_step, rows), rows, lr)
            loss_sum += losses.double() if everyone else losses.double() * (on_device > s)
            self.local_step += act
        node_steps = int(steps.sum())

        first = len(self.comm.events)
        up_local = alive[self.nodes]
        up_device = None if bool(up_local.all()) else to_device(up_local, self.device)
        last = r + 1 == cfg.rounds
        if bool(take.any()) or last:
            with self._freeze_down(up_device):
                if bool(take.any()):
                    self.algorithm.step((r + 1) * self.steps_per_round, active=up_device)
                if last:  # an overlapped run's last outer step, before the final evaluation
                    self.algorithm.flush()
        events = self.comm.events[first:]
        del self.comm.events[:]
        # client-server FedAvg (allreduce="star") with client sampling: the server exchanges
        # the model with the sampled clients only (the all-reduce counts every node that is up,
        # as torch.distributed does); the others idle and catch up at the round's end
        star_sampled = sampled is not None and cfg.allreduce == "star"
        if star_sampled:
            assert sampled is not None
            events = [e if e.participants is None else
                      dataclasses.replace(e, participants=e.participants & sampled)
                      for e in events]
        evaluated = (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds
        ev = self._evaluate(alive, r) if evaluated else None  # queued on the device
        before = self.clock.now
        self.clock.compute(r, steps, slow)
        for k, event in enumerate(events):
            self.clock.communicate(r, k, event, alive)
        if last:  # the last outer step (flush above) waited for what was still in flight
            self.clock.flush()
        self.clock.end_round(alive & sampled if star_sampled else alive)

        per_node = self.comm.bytes_per_node.clone()
        consensus = None
        if ev is not None and not self.one_model:
            consensus = self.consensus_distance(alive[self.nodes])
        # the round's one wait for the device: its loss and its evaluation, in one copy
        queued = [loss_sum.sum().reshape(1)]
        if ev is not None:
            queued += [v.to(torch.float64) for v in ev[2].values()]
        copied, done = _to_host(torch.cat(queued))
        record: dict[str, Any] = {
            "kind": "round",
            "round": r + 1,
            "step": (r + 1) * self.steps_per_round,
            "alive": int(alive.sum()),
            "node_steps": node_steps,
            "train_loss": None,
            "bytes_total": float(per_node.sum()),
            "bytes_per_node": float(per_node.mean()),
            "bytes_per_node_max": float(per_node.max()),
            "sim_seconds": self.clock.now,
            "round_sim_seconds": self.clock.now - before,
        }
        trained_steps = local_steps.sum().double()

        def finish() -> dict[str, Any]:
            if done is not None:
                done.synchronize()
            host = copied.split([len(v) for v in queued])
            trained = self._sum(torch.stack([host[0][0], trained_steps]))
            if trained[1] > 0:
                record["train_loss"] = float(trained[0] / trained[1])
            if ev is not None:
                chosen, rows, values = ev
                figures = dict(zip(values, host[1:], strict=True))
                record.update(self._eval_record(r, chosen, rows, figures, per_node,
                                                consensus))
            return record

        return finish

    @contextmanager
    def _freeze_down(self, up: Tensor | None) -> Iterator[None]:
        """Nodes that are down (False in ``up``; None = every node is up) keep parameters and
        algorithm state through the sync, and state created lazily during it starts at zero
        for them. Not for algorithms with one global model (FedAvg, DiLoCo): a node that was
        down pulls the current global model."""
        if up is None or self.algorithm.global_model:
            yield  # FedAvg/DiLoCo: down nodes get the global model too (pulled on return)
            return
        before = self.algorithm.state_rows()
        seen = {id(t) for t in before}
        with torch.no_grad(), frozen_rows(self.model.state_tensors() + before, up):
            yield
        with torch.no_grad():
            for t in self.algorithm.state_rows():
                if id(t) not in seen:
                    t[~up.to(t.device)] = 0

    # --------------------------------------------------------------------- metrics

    def evaluate(self) -> dict[str, Tensor]:
        """Every local node on the task's test set: ``nodes`` [L], ``loss`` [L] and (not for
        regression) ``accuracy`` [L], float64 on the CPU."""
        loss, acc = self.model.evaluate(self.x_test, self.y_test)
        out = {"nodes": self.nodes.clone(), "loss": loss.cpu()}
        if acc is not None:
            out["accuracy"] = acc.cpu()
        return out

    def consensus_distance(self, mask: Tensor | None = None) -> float:
        """``(1/n) sum_i ||x_i - mean||^2`` over the nodes in ``mask`` [L] (default: all), in
        float64: sums accumulated in float64 without a float64 copy of the rows, and each
        chunk's squared distances as one dot product of its float64 differences (at N = 1,000 on
        digits this took as long as evaluating every node)."""
        m = torch.ones(len(self.nodes), dtype=torch.bool) if mask is None else mask.cpu()
        count = float(self._sum(m.sum().double().reshape(1)))
        if count == 0:
            return float("nan")
        every = bool(m.all())
        total = 0.0
        for buf in self.model.flat.buffers():
            dev_mask = m.to(buf.device)

            def chunks(buf: Tensor = buf, dev_mask: Tensor = dev_mask) -> Iterator[Tensor]:
                for r0 in range(0, buf.shape[0], _ROW_CHUNK):
                    rows = buf[r0:r0 + _ROW_CHUNK]
                    yield rows if every else rows[dev_mask[r0:r0 + _ROW_CHUNK]]
            s = torch.zeros(buf.shape[1], dtype=torch.float64, device=buf.device)
            for rows in chunks():
                s += rows.sum(dim=0, dtype=torch.float64)
            mean = self._sum(s) / count
            sq = torch.zeros((), dtype=torch.float64, device=buf.device)
            for rows in chunks():
                diff = rows.to(torch.float64).sub_(mean).reshape(-1)
                sq += torch.dot(diff, diff)
            total += float(self._sum(sq.reshape(1)))
        return total / count

    def _evaluate(self, alive: Tensor, r: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Round ``r``'s test evaluation, right after its sync (:mod:`simulations.evaluate`),
        queued on the device: one model where the algorithm has a global one, else a seeded
        sample of the up nodes in one vectorized forward. Returns the chosen nodes (a global
        mask), their local rows and the per-row figures (on the device)."""
        chosen = alive if self.one_model else eval_sample(
            alive, self.cfg.eval_nodes, seed=self.cfg.seed, round_index=r)
        rows = chosen[self.nodes].nonzero().flatten()
        return chosen, rows, evaluate_rows(self.model, self.x_test, self.y_test, rows,
                                           one_model=self.one_model,
                                           graphs=self.graphs)

    def _eval_record(self, r: int, chosen: Tensor, rows: Tensor, ev: dict[str, Tensor],
                     per_node: Tensor, consensus: float | None) -> dict[str, Any]:
        """The test metrics of round ``r`` from :meth:`_evaluate` (``ev`` now on the host),
        reduced over every shard, with the round's bytes ``per_node`` and consensus distance
        (None: a global model, whose consensus distance is 0, since every row holds it)."""
        one = self.one_model
        step = (r + 1) * self.steps_per_round
        out: dict[str, Any] = {"consensus_distance": 0.0 if consensus is None else consensus}
        out["eval_nodes"] = int(self._sum(torch.tensor([float(len(rows))], dtype=torch.float64)))
        # the same keys on every shard, one with no row included (the reductions must match)
        keys = ["loss"] + (["accuracy"] if self.task.data.kind != "regression" else [])
        for key in keys:
            v = ev.get(key, torch.zeros(0, dtype=torch.float64))
            if one and v.numel():  # one row's figure stands for every row
                value = float(v[0])
                total, count, least, most = value * len(rows), float(len(rows)), value, value
            else:
                total, count = float(v.sum()), float(v.numel())
                least = float(v.min()) if v.numel() else math.inf
                most = float(v.max()) if v.numel() else -math.inf
            stats = self._sum(torch.tensor([total, count], dtype=torch.float64))
            lo = self._reduce(torch.tensor([least], dtype=torch.float64), dist.ReduceOp.MIN)
            hi = self._reduce(torch.tensor([most], dtype=torch.float64), dist.ReduceOp.MAX)
            if stats[1] > 0:
                out[f"{key}_mean"] = float(stats[0] / stats[1])
                out[f"{key}_min"] = float(lo[0])
                out[f"{key}_max"] = float(hi[0])
        if one:  # one model, which every node holds: one row
            if "loss_mean" in out:
                out["eval_rows"] = eval_rows(
                    step, [None], [out["loss_mean"]], [out["accuracy_mean"]]
                    if "accuracy_mean" in out else None, round=[r + 1],
                    bytes_total=[float(per_node.mean())])
            return out
        ids = chosen.nonzero().flatten()  # the sample's global ids, ascending
        values = torch.zeros(len(keys), len(ids), dtype=torch.float64)
        if len(rows):
            at = torch.searchsorted(ids, self.nodes[rows].cpu())
            values[:, at] = torch.stack([ev[k].to(torch.float64) for k in keys])
        values = self._sum(values).tolist()  # every shard's rows, on every shard
        out["eval_rows"] = eval_rows(step, ids.tolist(), *values, round=[r + 1] * len(ids),
                                     bytes_total=per_node[ids].tolist())
        return out

    def _sum(self, t: Tensor) -> Tensor:
        return self._reduce(t, dist.ReduceOp.SUM)

    def _reduce(self, t: Tensor, op: Any) -> Tensor:
        if self.group is None:
            return t
        device = t.device
        if dist.get_backend(self.group) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=op, group=self.group)
        return t.to(device)


def _to_host(t: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
    """``t`` copied to the host without waiting, and the event that marks the copy done (None:
    ``t`` was on the host already)."""
    if t.device.type != "cuda":
        return t.cpu(), None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


# ----------------------------------------------------------------------------- run directory


class Runner(Protocol):
    """What :func:`drive` needs: a :class:`Simulation`, or a Ray driver over its shards."""

    cfg: SimConfig

    def info(self) -> dict[str, Any]: ...
    def label_counts(self) -> np.ndarray | None: ...
    def run_round(self, r: int) -> dict[str, Any]: ...


def describe(cfg: SimConfig, records: Sequence[dict[str, Any]], *, steps_to_90: int | None,
             wall_seconds: float, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a simulated run's summary.json says besides the figures of its records
    (:class:`gossip.records.Summarizer`): the settings and the totals of its ``round`` records
    ``records``; ``steps_to_90`` (the summarizer's) gives ``rounds_to_90``."""
    last = records[-1] if records else {}
    to_90 = next((rec for rec in records if rec["step"] == steps_to_90), None)
    node_steps = sum(int(rec.get("node_steps", 0)) for rec in records)
    return {
        "algo": cfg.algo,
        "task": cfg.task,
        "nodes": cfg.nodes,
        "rounds": len(records),
        "partition": cfg.partition,
        "topology": cfg.topology,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "rounds_to_90": None if to_90 is None else to_90["round"],
        "sim_seconds_to_90": None if to_90 is None else to_90["sim_seconds"],
        "bytes_per_node": last.get("bytes_per_node", 0.0),
        "bytes_total": last.get("bytes_total", 0.0),
        "simulated_seconds": last.get("sim_seconds", 0.0),
        "wall_seconds": wall_seconds,
        "node_steps": node_steps,
        "node_steps_per_second": node_steps / wall_seconds if wall_seconds > 0 else None,
        **(info or {}),
    }


class RunRecorder:
    """Writes one simulated run's directory: config.json, metrics.jsonl, summary.json, plots.

    :meth:`log` takes a round's record as :meth:`Simulation.run_round` returns it and writes its
    ``eval`` rows and the ``round`` record in one append. Only the round records are kept
    (``records``); the summary's figures are accumulated as the rows go by, and the plots read
    ``metrics.jsonl`` back. With ``out=None`` nothing is written; the round records and the
    summary are still kept.
    """

    def __init__(self, cfg: SimConfig, out: str | Path | None, *,
                 label_counts: np.ndarray | None = None, plots: bool = True,
                 info: dict[str, Any] | None = None, resumed_at: int | None = None) -> None:
        self.cfg = cfg
        self.out = None if out is None else Path(out)
        self.plots = plots
        self.records: list[dict[str, Any]] = []
        self.summarizer = Summarizer()
        # the run owns --out until finish() or interrupted(); refused before any write
        self.run_dir = None if self.out is None else RunDir(
            self.out, resume=cfg.resume, overwrite=cfg.overwrite).acquire()
        config = cfg.to_dict()
        if info is not None and "task" in info:  # the Task's own name and where it came from
            config["task_name"], config["task_source"] = info["task"], info["task_source"]
        try:
            if resumed_at is not None and self.out is not None:
                # resumed from the checkpoint at step resumed_at: the records after it were
                # written by the process that died, and the summary starts from the ones before
                metrics = self.out / "metrics.jsonl"
                truncate_jsonl(metrics, resumed_at)
                for rec in iter_jsonl(metrics) if metrics.exists() else ():
                    self.summarizer.add(rec)
                    if rec.get("kind") == "round":
                        self.records.append(rec)
            self.writer = RunWriter(self.out or ".", config, enabled=self.out is not None,
                                    resumed_at=resumed_at, tensorboard=cfg.tensorboard)
        except BaseException:  # (a full disk at config.json) the directory is given back
            if self.run_dir is not None:
                self.run_dir.release()
            raise
        self.label_counts = label_counts  # plotted at a successful end, with the rest

    def log(self, record: dict[str, Any]) -> None:
        rows = record.pop("eval_rows", [])
        for rec in (*rows, record):
            self.summarizer.add(rec)
        self.records.append(record)
        self.writer.log_many([*rows, record])

    def finish(self, *, wall_seconds: float, info: dict[str, Any] | None = None
               ) -> dict[str, Any]:
        figures = self.summarizer.result()
        summary = {**figures, **describe(self.cfg, self.records, wall_seconds=wall_seconds,
                                         steps_to_90=figures["steps_to_90"], info=info)}
        self.writer.close()
        if self.run_dir is not None:
            try:
                self.run_dir.write_summary(summary)
                if self.plots:  # after the summary: a failing plot cannot lose the results
                    try:
                        self._plot(self.run_dir.path)
                    except Exception as e:  # the run has finished: say so, and go on
                        if isinstance(e, OSError) and e.errno in NO_SPACE:  # one line
                            log.error("plots not written: %s; the results are in %s",
                                      e.strerror, self.run_dir.path)
                        else:
                            log.exception("plotting failed; the results are in %s",
                                          self.run_dir.path)
            finally:
                self.run_dir.release()
        return summary

    def _plot(self, path: Path) -> None:
        from gossip.plots import plot_label_distribution, plot_run

        if self.label_counts is not None:
            plot_label_distribution(self.label_counts, path / "label_distribution.png")
        plot_run(iter_jsonl(path / "metrics.jsonl"), path,
                 title=f"{self.cfg.algo}, {self.cfg.nodes} nodes, {self.cfg.partition}")

    def interrupted(self) -> None:
        """Ctrl-C: summary.json says so, with the last round recorded; the directory is freed."""
        self.writer.close()
        if self.run_dir is not None:
            self.run_dir.write_interrupted(len(self.records), algo=self.cfg.algo,
                                           rounds=self.cfg.rounds)
            self.run_dir.release()


def drive(runner: Runner, *, out: str | Path | None = None, progress: bool | None = None,
          plots: bool = True, resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every round of ``runner``, write the run directory (``out``, default
    ``runner.cfg.out``; None there too = write nothing) and return the summary, with the
    per-round records under ``"records"`` (summary.json holds the rest).

    ``resume``: the checkpoint ``runner`` was restored from (:func:`simulations.checkpoint.load`):
    the rounds go on after its round, and the run directory's records after it are dropped.
    With ``cfg.checkpoint_every`` a checkpoint is written every that many rounds
    (:func:`simulations.checkpoint.save`; a :class:`Simulation` only). With ``cfg.save_models``
    the final models are written to ``out`` (:meth:`Simulation.save_models`) before
    summary.json, whose ``"finished"`` says the run directory is complete.

    A Ray driver reuses this with a runner that forwards ``run_round`` to its shards and returns
    shard 0's record (every shard returns the same global record)."""
    from simulations import checkpoint

    cfg = runner.cfg
    out = cfg.out if out is None else out
    info = runner.info()
    first = 0 if resume is None else int(resume["step"])
    recorder = RunRecorder(cfg, out, label_counts=runner.label_counts() if out else None,
                           plots=plots, info=info,
                           resumed_at=None if resume is None else first * info["steps_per_round"])
    if recorder.run_dir is not None:  # held: what a killed process left half-written goes
        checkpoint.sweep(recorder.run_dir.path)
    show = (cfg.progress if cfg.progress is not None else sys.stderr.isatty()) \
        if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=cfg.rounds, initial=first, desc=f"{cfg.algo} N={cfg.nodes}",
                   unit="round", file=sys.stderr)  # a resumed run: from its checkpoint's round
    # wall_seconds and cpu_seconds: the rounds (training, syncs, evaluation, records), from the
    # first round's start; the set-up before it is start-up (a resumed run's go on from the
    # checkpoint's)
    t0, cpu0 = time.perf_counter(), time.process_time()
    if resume is not None:
        t0 -= float(resume.get("wall_seconds", 0.0))
        cpu0 -= float(resume.get("cpu_seconds", 0.0))

    def log(record: dict[str, Any], ended: float | None = None) -> None:
        """``ended``: when the round ended (default: now)."""
        record["wall_seconds"] = (time.perf_counter() if ended is None else ended) - t0
        recorder.log(record)
        if bar is not None:
            bar.update(1)
            if record.get("accuracy_mean") is not None:
                bar.set_postfix(acc=f"{record['accuracy_mean']:.3f}",
                                sim_s=f"{record['sim_seconds']:.1f}")

    # a Simulation starts round r + 1 before it reads round r's figures (start_round); on the
    # CPU start_round runs the whole round, so the round ended when it returned (not when its
    # record is read, after the next round), while a GPU's round ends when its figures arrive
    start = getattr(runner, "start_round", None)
    on_host = cfg.device != "cuda"
    pending: Callable[[], dict[str, Any]] | None = None
    pending_end: float | None = None
    try:
        for r in range(first, cfg.rounds):
            if start is None:
                log(runner.run_round(r))
            else:
                started = start(r)
                ended = time.perf_counter() if on_host else None
                (finish, finish_end), (pending, pending_end) = \
                    (pending, pending_end), (started, ended)
                if finish is not None:
                    log(finish(), finish_end)
            if checkpoint.due(cfg, r + 1):  # round r recorded, then its state written
                if pending is not None:
                    (finish, finish_end), pending = (pending, pending_end), None
                    log(finish(), finish_end)
                checkpoint.save(runner, r + 1, time.perf_counter() - t0,  # type: ignore[arg-type]
                                cpu_seconds=time.process_time() - cpu0)
        if pending is not None:
            (finish, finish_end), pending = (pending, pending_end), None
            log(finish(), finish_end)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        save_models = getattr(runner, "save_models", None)
        if cfg.save_models and out is not None and save_models is not None:
            # before summary.json says "finished": a run killed while it writes them has no
            # summary (Ctrl-C: "interrupted"), so --resume redoes the rounds since the last
            # checkpoint and writes them, rather than refusing a finished run that has none
            save_models(out)
    except BaseException as e:
        if pending is not None and isinstance(e, KeyboardInterrupt):
            log(pending(), pending_end)  # the last round that ran to its end, recorded
        if isinstance(e, KeyboardInterrupt):
            recorder.interrupted()
        elif recorder.run_dir is not None:
            recorder.run_dir.release()
        raise
    finally:
        if bar is not None:
            bar.close()
    # cpu_seconds: this process's CPU time over the rounds (with Ray actors: the driver's only)
    summary = recorder.finish(wall_seconds=wall, info={**info, "cpu_seconds": cpu})
    summary_out = dict(summary)
    summary_out["records"] = recorder.records
    return summary_out


def set_threads(cfg: SimConfig) -> int:
    """Apply ``cfg.threads`` to torch (0 = :func:`simulations.threads.auto_threads`: 1 below
    512 nodes, else the CPUs the machine's load leaves free)."""
    threads = cfg.threads or auto_threads(cfg.nodes)
    torch.set_num_threads(threads)
    return threads
