"""What :func:`gossip.reuse_freed_memory` saves: the CPU side of a sync, with and without it.

Each setting runs in a fresh process (the setting is process-wide): ``GOSSIP_REUSE_MEMORY=0``
(glibc's default: tensors above 32 MiB get fresh, page-faulting pages) against the launchers'
setting. One thread each. Timed, as the CPU seconds of the process (steadier than wall time on
a shared machine), the median of ``--repeats`` after one warm-up, on a ``--params`` million
fp32 model:

- ``int8_encode`` / ``int8_decode``: the int8 codec (256-element blocks) of the whole buffer;
- ``int8_allreduce``: a compressed all-reduce of 4 stacked rows (the simulator's path: encode,
  decode, weighted sum, re-encode, decode);
- ``diloco_sync`` / ``noloco_sync``: one outer step of DiLoCo / NoLoCo on 2 stacked nodes,
  the math a real rank does around its transfer;
- ``new_tensor``: ``x.abs()``, one fresh model-sized tensor.

Prints one JSON line per setting and one with the ratios (default over reuse).

    python benchmarks/allocator.py                 # 16M parameters, 5 repeats
    python benchmarks/allocator.py --params 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def child(params: int, repeats: int) -> dict[str, Any]:
    from gossip.allocator import reuse_freed_memory

    applied = reuse_freed_memory()
    import torch

    from gossip.algorithms import build_algorithm, make_config
    from gossip.comm import StackedCommunicator
    from gossip.comm.compressed import stacked_all_reduce_mean_
    from gossip.compress import Compressor, parse_codec
    from gossip.flat import FlatParams

    torch.set_num_threads(1)
    torch.manual_seed(0)
    codec = parse_codec("int8")
    x = torch.randn(1, params)
    wire = codec.encode(x)
    rows = torch.randn(4, params)
    comm4 = StackedCommunicator(4)
    comp = Compressor(codec, 4, params)

    def outer(algo: str) -> Any:
        comm = StackedCommunicator(2)
        flat = FlatParams.from_stacked({"w": torch.randn(2, params)})
        alg = build_algorithm(algo, make_config(algo, sync_every=1), flat, comm)
        state = {"step": 0}

        def run() -> None:
            state["step"] += 1
            for buf in flat.buffers():
                buf.add_(torch.randn_like(buf[:, :1]), alpha=1e-3)  # as if trained
            alg.step(state["step"])
        return run

    cases = {
        "int8_encode": lambda: codec.encode(x),
        "int8_decode": lambda: codec.decode(wire, params),
        "int8_allreduce": lambda: stacked_all_reduce_mean_(comm4, rows, None, comp),
        "diloco_sync": outer("diloco"),
        "noloco_sync": outer("noloco"),
        "new_tensor": lambda: x.abs(),
    }
    out: dict[str, float] = {}
    for name, fn in cases.items():
        fn()
        samples = []
        for _ in range(repeats):
            t0 = time.process_time()
            fn()
            samples.append(time.process_time() - t0)
        out[name] = round(statistics.median(samples), 4)
    return {"reuse_freed_memory": applied, "cpu_seconds": out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--params", type=float, default=16, help="millions of parameters")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = int(args.params * 1_000_000) // 1000 * 1000
    if args.child:
        print(json.dumps(child(params, args.repeats)))
        return 0
    results = {}
    for setting, env_value in (("default", "0"), ("reuse", "1")):
        env = {**os.environ, "GOSSIP_REUSE_MEMORY": env_value,
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        load = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, __file__, "--child", "--params", str(args.params),
                               "--repeats", str(args.repeats)], env=env, check=True,
                              capture_output=True, text=True)
        results[setting] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({"setting": setting, "params": params, "load_before": round(load, 2),
                          **results[setting]}), flush=True)
    a, b = results["default"]["cpu_seconds"], results["reuse"]["cpu_seconds"]
    print(json.dumps({"ratio_default_over_reuse": {k: round(a[k] / b[k], 2) if b[k] else None
                                                   for k in a}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
