"""The training loop for real runs: one process per rank, under torchrun.

    torchrun --standalone --nproc-per-node 4 -m launch.train \\
        --algo fedavg --task digits --steps 300 --sync-every 10 --out runs/x

The run layer (:mod:`gossip.run`) builds this rank's task, shard, model, optimizer, schedule
and algorithm from the config, exactly as the simulator builds its nodes. Each rank trains on
its shard and calls the algorithm after every inner optimizer step; the algorithm decides when
to communicate. Every ``--eval-every`` steps each rank evaluates its model on the test set and
the consensus distance is measured; records reach the run directory through one gatherer
(:mod:`launch.records`: collectives, or per-rank files with ``--survive-failures``).
``--checkpoint-every`` writes resumable checkpoints (:mod:`gossip.checkpoint`); ``--resume``
continues from the latest one bit for bit, also as the restart command of
``torchrun --max-restarts``. All randomness derives from ``--seed`` and the rank.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
    def _startup_interrupt(*_: object) -> None:  # Ctrl-C while torch imports: no traceback
        print("interrupted during start-up: nothing was written", file=sys.stderr, flush=True)
        os._exit(130)  # at once: an import's `except BaseException` could swallow an exception

    signal.signal(signal.SIGINT, _startup_interrupt)  # main() takes Ctrl-C over


import torch
import torch.distributed as dist
from torch import nn

from gossip import checkpoint as ckpt
from gossip.algorithms import same_init
from gossip.allocator import reuse_freed_memory
from gossip.comm import CommError, TorchCommunicator
from gossip.flat import FlatParams, scope_from_spec
from gossip.metrics import NO_SPACE, no_space_message, read_jsonl
from gossip.plots import plot_run
from gossip.records import summarize, table
from gossip.run import build
from gossip.rundir import RunDir, interrupt_on_signal, interrupted_report
from launch.config import TrainConfig, build_parser, check_out, default_out, from_args
from launch.rank import (
    RunError,
    ShardStream,
    agree,
    check_same_config,
    configure_logging,
    derived_seed,
    evaluate,
    join_process_group,
    leave,
    pick_device,
    single_process_env,
    test_set,
)
from launch.records import describe, gatherer
from launch.spawn import torchrun_store_warning
from launch.state import eval_mean_model, mean_buffers, resume, resume_changes, save

__all__ = ["main", "train"]

log = logging.getLogger("launch.train")

#: Fault injection for tests of ``torchrun --max-restarts``: the last rank exits (status 17) after
#: this step, on the first attempt only (TORCHELASTIC_RESTART_COUNT == 0).
FAULT_ENV = "GOSSIP_FAULT_EXIT_AT_STEP"


def train(cfg: TrainConfig, comm: TorchCommunicator) -> dict[str, Any] | None:
    """Run ``cfg`` on this rank of an initialised process group; the rank that writes the
    summary returns it. Without ``--out`` the ranks agree on rank 0's new runs/<UTC time>.

    Rank 0 owns the run directory (:class:`gossip.rundir.RunDir`) for the run's life; a refusal
    stops every rank. Ctrl-C or SIGTERM leaves ``summary.json`` saying ``interrupted``."""
    if cfg.out is None:
        names = [default_out() if comm.rank == 0 else None]
        dist.broadcast_object_list(names, src=0)
        cfg = dataclasses.replace(cfg, out=names[0])
    check_same_config(cfg.to_dict())  # before rank 0 takes the directory
    run_dir = RunDir(str(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)
    agree(lambda: run_dir.acquire() if comm.rank == 0 else None)
    progress = [0]  # the last step done
    try:
        return _train(cfg, comm, run_dir, progress)
    except KeyboardInterrupt as e:
        if comm.rank == 0:
            run_dir.write_interrupted(progress[0], algo=cfg.algo, steps=cfg.steps)
            log.warning("%s", interrupted_report([run_dir.path]))
            e.reported = True  # type: ignore[attr-defined]  # main prints nothing more
        raise
    finally:
        run_dir.release()


def _train(cfg: TrainConfig, comm: TorchCommunicator, run_dir: RunDir, progress: list[int]
           ) -> dict[str, Any] | None:
    rank, n, out = comm.rank, comm.world_size, run_dir.path
    device = pick_device(cfg, comm.backend)

    # ---- build: the run layer, the same calls the simulator makes
    task = agree(lambda: build.load_task(cfg.task, seed=cfg.seed, init=cfg.init))
    cfg = cfg.resolved(task, n)
    torch.manual_seed(derived_seed(cfg.seed, rank, 1))
    shards = agree(lambda: build.make_shards(cfg, task, n))
    shard = shards[rank]
    model = build.node_model(task, cfg.seed, rank, same_init=same_init(cfg.algo))
    model = model.to(device).train()
    params = FlatParams.from_module(model, scope_from_spec(cfg.vc_scope or "weights"))
    opt = agree(lambda: build.make_optimizer(cfg, params.params))
    topology = agree(lambda: build.make_topology_for(cfg, n))
    algo, algo_config = agree(lambda: build.make_algorithm(
        cfg, params, comm, topology=topology,
        weight=torch.tensor([float(len(shard))], dtype=torch.float64)))
    stream = ShardStream(task, shard, cfg.batch_size or 1, cfg.seed, rank, device)
    x_test, y_test = test_set(task, device)
    # a loss_fn that returns no mean loss is refused before anything is written
    agree(lambda: build.check_loss(task, model, x_test, y_test, cfg.batch_size or 1))
    meta = {"format": ckpt.FORMAT_VERSION, "algo": cfg.algo, "task": cfg.task, "world_size": n}

    # ---- resume (an error on any rank is every rank's)
    start, c, changes = agree(lambda: resume(cfg, out, rank, meta, params, opt, algo, stream,
                                             device, model))
    progress[0] = start
    if start:
        log.info("resumed from %s at step %d", ckpt.checkpoint_dir(out), start)
        latest = ckpt.read_latest(out) or {}
        if rank == 0 and latest.get("absent"):
            log.warning("the checkpoint of step %d has no file of rank(s) %s (dead when the "
                        "survivors wrote it): they resume from rank %d's state", start,
                        latest["absent"], ckpt.stand_in(latest, latest["absent"][0]))
    elif cfg.resume:
        log.info("no checkpoint in %s: starting from step 0", out)
    config_record = {
        "train": cfg.to_dict(), "algorithm": dataclasses.asdict(algo_config),
        "task": {"name": task.name, "source": build.task_source(cfg.task)},
        "world_size": n, "backend": comm.backend, "device": str(device),
        "shard_sizes": [len(s) for s in shards], "model_parameters": params.numel,
        "torch": torch.__version__, "resume_changes": resume_changes(out, start, changes)}
    records = gatherer(out, comm, config_record, resumed_from=start, timeout=cfg.timeout,
                       tensorboard=cfg.tensorboard)
    pending: list[dict[str, Any]] = []  # this rank's records not yet flushed
    deaths_seen: set[int] = set()
    final: dict[str, Any] = {}

    def on_eval(step: int, *, last: bool, record: bool = True) -> None:
        metrics = evaluate(task, model, x_test, y_test)
        train_loss = c.eval_loss_sum / c.eval_loss_count if c.eval_loss_count else None
        c.eval_loss_sum, c.eval_loss_count = 0.0, 0
        distance, mean = records.consensus(params)
        rec = {"kind": "eval", "step": step, "node": rank, "loss": metrics["loss"],
               "train_loss": train_loss, "bytes_total": c.bytes_sent,
               "sync_seconds_total": c.sync_seconds}
        if "accuracy" in metrics:
            rec["accuracy"] = metrics["accuracy"]
        if record:
            pending.append(rec)
            if rank == 0 and distance is not None:
                pending.append({"kind": "consensus", "step": step,
                                "consensus_distance": distance})
        if last:
            final.update(eval=rec)
            # (collective: every rank, where the consensus was measured)
            buffers = mean_buffers(model, comm) if mean is not None else None
            if rank == 0 and mean is not None:
                final["avg_model"] = eval_mean_model(task, mean, device, x_test, y_test,
                                                     buffers)
        if rank == 0 and record:
            acc = metrics.get("accuracy")
            log.info("step %d/%d (rank 0) test loss %.4f%s%s", step, cfg.steps,
                     metrics["loss"], "" if acc is None else f" acc {acc:.4f}",
                     "" if distance is None else f" consensus {distance:.3g}")

    def on_sync(stats: Any) -> None:
        c.bytes_sent += stats.bytes_sent
        c.sync_seconds += stats.seconds
        c.syncs += 1
        loss = c.sync_loss_sum / max(c.sync_loss_count, 1)
        c.sync_loss_sum, c.sync_loss_count = 0.0, 0
        pending.append({"kind": "sync", "step": stats.step, "node": rank, "train_loss": loss,
                        "bytes_sent": stats.bytes_sent, "sync_seconds": stats.seconds,
                        "bytes_total": c.bytes_sent, **stats.extra})
        for dead, at in comm.deaths.items():
            if dead not in deaths_seen:
                deaths_seen.add(dead)
                log.warning("rank %d: peer rank %d is dead (noticed at step %d); going on "
                            "without it", rank, dead, at)
                pending.append({"kind": "death", "step": stats.step, "node": dead,
                                "detected_by": rank, "detected_at_step": at,
                                "unix_time": time.time(), "reason": comm.failures.get(
                                    dead, "no heartbeat, or a peer reported it")})

    def flush() -> None:
        records.flush(pending)
        pending.clear()

    # ---- the loop
    fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or rank != n - 1:
        fault_step = 0
    # step losses are summed on the device (a host sync per step would stall a GPU)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    t0, wall0, unfolded = time.perf_counter(), c.wall_seconds, 0
    try:
        for step in range(start + 1, cfg.steps + 1):
            comm.step = step
            if cfg.schedule != "constant":
                for group in opt.param_groups:
                    group["lr"] = build.scheduled_lr(cfg, step - 1, cfg.steps)
            x, y = stream.next()
            loss = task.loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(params.params, cfg.grad_clip)
            opt.step()
            loss_sum += loss.detach().to(torch.float64)
            unfolded += 1
            stats = algo.step(step)
            last = step == cfg.steps
            if last:
                algo.flush()  # an overlapped run's last outer step, before the final eval
            evaluating = step % (cfg.eval_every or 50) == 0 or last
            saving = bool(cfg.checkpoint_every) and (step % cfg.checkpoint_every == 0 or last)
            if stats is not None or evaluating or saving:  # fold the losses into the counters
                c.add_losses(float(loss_sum), unfolded)
                loss_sum.zero_()
                unfolded = 0
            if stats is not None:
                on_sync(stats)
            if evaluating:
                on_eval(step, last=last)
            c.wall_seconds = wall0 + time.perf_counter() - t0
            if evaluating or saving:
                flush()
            if saving:
                save(out, step, rank, meta, params, opt, algo, stream, device, c, model)
                written = records.checkpoint_complete(step)  # on the marker's writer only
                if written is not None:  # config: check_resume's
                    ckpt.write_latest(out, step, {**meta, "config": cfg.to_dict()}, ranks=written)
                    if cfg.keep_checkpoints:
                        ckpt.prune(out, cfg.keep_checkpoints)
            progress[0] = step
            if step == fault_step:
                log.warning("%s=%d: exiting on purpose", FAULT_ENV, step)
                os._exit(17)
        if not final:  # resumed at the end: evaluate without re-recording
            on_eval(cfg.steps, last=True, record=False)
        c.wall_seconds = wall0 + time.perf_counter() - t0

        # ---- the end: every rank's final record, one summary
        mine = {"rank": rank, "samples": len(shard), "final_loss": final["eval"]["loss"],
                "final_accuracy": final["eval"].get("accuracy"),
                "final_train_loss": final["eval"]["train_loss"], "bytes_sent": c.bytes_sent,
                "sync_seconds": c.sync_seconds, "syncs": c.syncs}
        gathered = records.finish(mine)
        if gathered is None:
            return None
        per_rank, extra = gathered
        metrics = read_jsonl(out / "metrics.jsonl")  # read once: the summary, then the plots
        summary = summarize(metrics, **describe(
            cfg, task.name, n, per_rank, final, c.wall_seconds, resumed_from=start or None,
            task_source=build.task_source(cfg.task)), **extra)
        run_dir.write_summary(summary)  # also by a survivor when rank 0 died
    finally:
        records.close()
    try:
        plot_run(metrics, out,
                 title=f"{cfg.algo} on {task.name}, {n} ranks")
    except Exception as e:
        if isinstance(e, OSError) and e.errno in NO_SPACE:  # results written: one line
            log.error("plots not written: %s", e.strerror)
        else:
            log.exception("plotting failed")
    print(table(summary), flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    reuse_freed_memory()  # model-sized temporaries without page faults (gossip.allocator)
    parser = build_parser()
    try:
        cfg = from_args(argv)
        check_out(cfg.out or "runs")  # before any process group forms, on every rank alike
    except ValueError as e:
        parser.error(str(e))  # exits with status 2
    single_process_env()  # plain `python -m launch.train`: a world of one process
    rank = int(os.environ["RANK"])
    configure_logging(rank)
    signal.signal(signal.SIGTERM, interrupt_on_signal)  # SIGTERM ends the run like Ctrl-C
    comm: TorchCommunicator | None = None
    try:
        comm = join_process_group(None if cfg.backend == "auto" else cfg.backend, cfg.timeout,
                                  survive=cfg.survive_failures, dead_after=cfg.dead_after)
        warning = torchrun_store_warning(os.environ, cfg.survive_failures)
        if warning and rank == 0:
            log.warning("%s", warning)
        train(cfg, comm)
    except KeyboardInterrupt as e:  # one line (rank 0's), no traceback
        if rank == 0 and not getattr(e, "reported", False):
            log.warning("interrupted before the run started: nothing was written")
        return 130
    except RunError as e:
        if rank == 0:
            log.error("%s", e)
        return 2
    except CommError as e:
        log.error("rank %d stops: %s", rank, e)
        return 3
    except OSError as e:  # a full disk: what it says and what the run kept, no traceback
        if e.errno not in NO_SPACE:
            raise
        kept = interrupted_report([cfg.out] if cfg.out else [], reason="stopped")
        log.error("rank %d stops: %s; %s", rank, no_space_message(e, cfg.out), kept)
        return 1
    finally:
        if comm is not None:
            if comm.monitor is not None:
                comm.monitor.close()
            if dist.is_initialized() and not comm.deaths:
                dist.destroy_process_group()  # with dead peers it could wait on them: just exit
    return 0


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # Ctrl-C is main()'s from here
        signal.signal(signal.SIGINT, signal.default_int_handler)
    leave(main())  # (no interpreter teardown: see launch.rank.leave)
