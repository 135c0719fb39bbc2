"""Ray plumbing shared by the real launcher (``launch``) and the simulator (``simulations``).

:mod:`raytools.workers` holds :class:`~raytools.workers.WorkerGroup`, Ray actors that behave like
torchrun's worker processes. Neither ``launch`` nor ``simulations`` imports the other; both use
this package. The library (``gossip``) never imports it.
"""
