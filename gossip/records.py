"""The one record schema of ``metrics.jsonl``, real and simulated runs alike, and the one summary
and text table made from it.

Every record is one JSON object with a ``kind`` and a ``step`` (inner optimizer steps done: a
rank's steps on a real run; rounds times steps per round in the simulator). A **node** is a rank
on a real run and a virtual node id in the simulator. Figures in a node's record are that node's;
figures in a ``round`` record are over all nodes.

- ``eval``, one row per node per evaluation: ``node``, test ``loss``, test ``accuracy``
  (classification only), ``bytes_total`` (the node's bytes sent so far); real runs add
  ``train_loss`` (mean since the last evaluation) and ``sync_seconds_total``; the simulator
  adds ``round``. The simulator writes the rows of its evaluated sample only (``eval_nodes``),
  and where every node holds one model after a sync (FedAvg; DiLoCo without fragments) one row
  with ``node`` null: that model, which every node holds.
- ``sync``, real runs, one per rank per synchronisation: ``node``, ``train_loss`` (mean since
  the last sync), ``bytes_sent``, ``sync_seconds``, ``bytes_total``, and the algorithm's own
  figures.
- ``consensus``, real runs, one per evaluation (not with ``--survive-failures``):
  ``consensus_distance``, ``(1/n) sum_i ||x_i - mean||^2``.
- ``death``, real runs with ``--survive-failures``: ``node`` (the dead rank), ``detected_by``,
  ``detected_at_step``, ``unix_time``, ``reason``.
- ``round``, the simulator, one per round, after its eval rows: ``round``, ``alive``,
  ``node_steps``, ``train_loss``, ``bytes_total``, ``bytes_per_node``, ``bytes_per_node_max``,
  ``sim_seconds``, ``round_sim_seconds``, ``wall_seconds`` (since the first round began); an
  evaluated round adds ``consensus_distance``, ``eval_nodes`` and ``loss_``/``accuracy_``
  ``mean``/``min``/``max`` (over the eval rows).

:func:`summarize` turns any such stream into the figures of ``summary.json`` that both
executors share; :func:`table` prints a summary, :func:`runs_table` several side by side.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["RECORD_ORDER", "Summarizer", "eval_rows", "runs_table", "sorted_records",
           "summarize", "table"]

#: The order of kinds within one step of ``metrics.jsonl``.
RECORD_ORDER = {"sync": 0, "death": 1, "eval": 2, "consensus": 3, "round": 4}


def sorted_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Records in ``metrics.jsonl`` order: by step, then kind, then node."""
    return sorted(records, key=lambda r: (r["step"], RECORD_ORDER.get(r["kind"], 9),
                                          -1 if r.get("node") is None else r["node"]))


def _finite(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


def eval_rows(step: int, nodes: Sequence[int | None], loss: Sequence[float],
              accuracy: Sequence[float] | None = None, **columns: Sequence[Any]
              ) -> list[dict[str, Any]]:
    """``eval`` rows of one evaluation from per-node columns (plain floats; NaN and inf become
    None), plus ``columns`` given per node (e.g. ``bytes_total``)."""
    cols: dict[str, Sequence[Any]] = {"loss": _finite(list(loss))}
    if accuracy is not None:
        cols["accuracy"] = list(accuracy)
    cols.update(columns)
    keys = ("kind", "step", "node", *cols)
    return [dict(zip(keys, ("eval", step, *values), strict=True))
            for values in zip(nodes, *cols.values(), strict=True)]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class Summarizer:
    """The figures :func:`summarize` reports, accumulated record by record (records in
    ``metrics.jsonl`` order) in the memory of one evaluation."""

    def __init__(self) -> None:
        self.step: int | None = None  # the latest evaluation's step
        self.rows: list[Mapping[str, Any]] = []  # its eval rows
        self.evaluations = 0
        self.step_to_90: int | None = None
        self.other: dict[str, tuple[int, Any]] = {}  # key -> (step, value) from other kinds

    def add(self, record: Mapping[str, Any]) -> None:
        step = record["step"]
        if record.get("kind") != "eval":
            for key in ("consensus_distance", "train_loss"):
                if record.get(key) is not None:
                    self.other[key] = (step, record[key])
            return
        if step != self.step:
            self._close()
            self.step, self.rows = step, []
            self.evaluations += 1
        self.rows.append(record)

    def _values(self, key: str) -> list[float]:
        """The finite ``key`` figures of the last evaluation's rows."""
        return [r[key] for r in self.rows if r.get(key) is not None and math.isfinite(r[key])]

    def _close(self) -> None:
        acc = _mean(self._values("accuracy"))
        if self.step_to_90 is None and acc is not None and acc >= 0.9:
            self.step_to_90 = self.step

    def result(self) -> dict[str, Any]:
        self._close()
        out: dict[str, Any] = {"final_step": self.step, "evaluations": self.evaluations,
                               "final_eval_nodes": len(self.rows), "steps_to_90": self.step_to_90}
        for key in ("loss", "accuracy"):
            values = self._values(key)
            out[f"final_{key}_mean"] = _mean(values)
            out[f"final_{key}_min"] = min(values) if values else None
            out[f"final_{key}_max"] = max(values) if values else None
        at_final = {k: v for k, (step, v) in self.other.items() if step == self.step}
        # a diverged node's loss (NaN, inf: null in metrics.jsonl) is left out of the figures
        # above, and counted here, so that a mean over the others does not hide it
        out["final_loss_nonfinite"] = sum(
            1 for r in self.rows
            if "loss" in r and (r["loss"] is None or not math.isfinite(r["loss"])))
        out["final_train_loss_mean"] = _mean(self._values("train_loss")) \
            if self._values("train_loss") else at_final.get("train_loss")
        out["final_consensus_distance"] = at_final.get("consensus_distance")
        return out


def summarize(records: Iterable[Mapping[str, Any]], **fields: Any) -> dict[str, Any]:
    """``summary.json`` figures of a run from its records (any executor), after ``fields`` (the
    executor's description of the run: algo, task, nodes, ...):

    - ``final_step``, ``evaluations``, ``final_eval_nodes`` (rows of the last evaluation);
    - ``final_loss_mean``/``min``/``max`` and ``final_accuracy_mean``/``min``/``max`` over the
      last evaluation's rows (None where absent), finite values only;
    - ``final_loss_nonfinite``: how many of those rows have a NaN or infinite loss (a diverged
      node; ``null`` in ``metrics.jsonl``);
    - ``final_train_loss_mean``: the last evaluation's rows' ``train_loss``, else the
      ``train_loss`` another record gives at that step;
    - ``final_consensus_distance``: the one recorded at the last evaluation's step, if any;
    - ``steps_to_90``: the first step whose rows' mean accuracy reaches 0.9.
    """
    s = Summarizer()
    for record in records:
        s.add(record)
    return {**fields, **s.result()}


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _loss(s: Mapping[str, Any]) -> str:
    """The final mean test loss, saying how many nodes diverged (a non-finite loss)."""
    bad = s.get("final_loss_nonfinite") or 0
    if not bad:
        return _f(s["final_loss_mean"], ".4f")
    if s["final_loss_mean"] is None:
        return f"nan ({bad} of {s['final_eval_nodes']} non-finite)"
    return (f"{s['final_loss_mean']:.4f} over the finite; {bad} of {s['final_eval_nodes']} "
            "non-finite")


def table(s: Mapping[str, Any]) -> str:
    """A run's summary as text: what ran, the per-rank table of a real run, the final figures."""
    real = "per_rank" in s
    what = (f"{s['world_size']} ranks, {s['steps']} steps" if real else
            f"{s['nodes']} nodes, {s['rounds']} rounds x {s.get('steps_per_round', '?')} "
            f"local steps")
    lines = [f"{s['algo']} on {s['task']}: {what}, partition {s['partition']}"
             + (f", topology {s['topology']}" if s.get("topology") else "")]
    if real:
        lines.append(f"  {'rank':>4} {'samples':>7} {'test loss':>9} {'test acc':>8} "
                     f"{'MB sent':>8} {'sync s':>7}")
        for r in s["per_rank"]:
            lines.append(f"  {r['rank']:>4} {r['samples']:>7} {_f(r['final_loss'], '.4f'):>9} "
                         f"{_f(r['final_accuracy'], '.4f'):>8} {r['bytes_sent'] / 1e6:>8.2f} "
                         f"{r['sync_seconds']:>7.2f}")
    lines += [
        f"  test accuracy  mean {_f(s['final_accuracy_mean'], '.4f')}  min "
        f"{_f(s['final_accuracy_min'], '.4f')}  max {_f(s['final_accuracy_max'], '.4f')}   "
        f"test loss {_loss(s)} (mean; step {s['final_step']}, "
        f"{s['final_eval_nodes']} evaluated)",
        f"  steps to 90%   {_f(s['steps_to_90'], 'd')}"
        + (f" (round {_f(s.get('rounds_to_90'), 'd')})" if not real else "")
        + f"   consensus distance {_f(s['final_consensus_distance'], '.3g')}",
        f"  sent per node  {s['bytes_per_node'] / 2**20:.2f} MiB   "
        + ("" if real else f"simulated time {s['simulated_seconds']:.1f} s   ")
        + f"wall time {s['wall_seconds']:.2f} s"]
    if s.get("avg_model_loss") is not None:
        lines.append(f"  averaged model test loss {_f(s['avg_model_loss'], '.4f')}, test acc "
                     f"{_f(s.get('avg_model_accuracy'), '.4f')}")
    return "\n".join(lines)


def runs_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Several runs' summaries side by side, one line each (``label: summary``)."""
    head = (f"{'run':<10} {'optimizer':<14} {'acc mean':>8} {'acc min':>8} {'steps→90%':>9} "
            f"{'MiB/node':>9} {'sim s':>8} {'sim s→90%':>9} {'wall s':>7}")
    lines = [head, "-" * len(head)]
    for label, s in summaries.items():
        opt = f"{s['optimizer']} {s['lr']:g}"
        lines.append(
            f"{label:<10} {opt:<14} {_f(s['final_accuracy_mean'], '.3f'):>8} "
            f"{_f(s['final_accuracy_min'], '.3f'):>8} {_f(s['steps_to_90'], 'd'):>9} "
            f"{s['bytes_per_node'] / 2**20:>9.2f} {_f(s.get('simulated_seconds'), '.1f'):>8} "
            f"{_f(s.get('sim_seconds_to_90'), '.1f'):>9} "
            f"{s.get('wall_seconds_total', s['wall_seconds']):>7.1f}")
    return "\n".join(lines)
