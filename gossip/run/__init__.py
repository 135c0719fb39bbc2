"""The one run layer under both executors (``launch`` for real runs, ``simulations``).

- :mod:`.spec`: :class:`RunSpec`, the composed, validated frozen spec every run has (task,
  partition, optimizer, schedule, algorithm options, one ``sync_every`` = H, seed) and the one
  table of defaults;
- :mod:`.build`: the builder (task, shards, init, optimizer, schedule, topology, algorithm);
- :mod:`.schedule`: inner learning-rate schedules in closed form;
- :mod:`.records`: the one record schema, summary, table and plots of a run directory.
"""

from gossip.run.spec import AlgorithmOptions, RunSpec

__all__ = ["AlgorithmOptions", "RunSpec"]
