"""A stand-in rank for tests/test_spawn.py: records its environment, then exits with the status
given for its rank (``python -m tests.spawn_child OUT CODE0 CODE1 ...``; ``kill`` = SIGKILL
itself)."""

import json
import os
import signal
import sys
from pathlib import Path

if __name__ == "__main__":
    out, codes = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ["RANK"])
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GOSSIP_STORE_PREFIX", "OMP_NUM_THREADS")
    (out / f"env_{rank}.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
    if codes[rank] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(int(codes[rank]))
