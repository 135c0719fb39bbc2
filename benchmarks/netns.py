"""Real shaped links on one machine: every rank in its own network namespace.

:class:`ShapedLan` builds, for ``n`` ranks,

- a namespace ``PREFIX-br`` holding a bridge ``br0`` (no address, no route anywhere);
- a namespace ``PREFIX-rI`` per rank, joined to the bridge by a veth pair created directly
  between the two namespaces (``eth0`` in the rank's namespace, ``pI`` on the bridge), with
  ``10.77.0.(I+1)/24`` on ``eth0`` and its own ``lo`` up;
- a ``tc tbf`` qdisc at ``rate`` on the egress of BOTH ends of every veth: ``eth0`` shapes the
  rank's uplink, ``pI`` its downlink. With ``delay`` (and a kernel that has ``netem``) a netem
  qdisc adds that one-way delay on the rank's uplink, with the tbf below it.

Nothing is created in the root namespace, no interface outside these namespaces is touched
(never ``lo`` or a host interface), and no address or route leads out of them. ``close()``
deletes every namespace it made (their veths and the bridge go with them); it runs on exit of
a ``with`` block, at interpreter exit and on SIGTERM. Names carry the creating process id, so
concurrent runs never collide and :func:`cleanup_stale` removes what a killed run left behind.

Needs root and iproute2 (``ip``, ``tc``); :func:`unavailable` says why not, or None.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence

__all__ = ["PREFIX", "ShapedLan", "cleanup_stale", "default_burst", "netem_available",
           "our_namespaces", "unavailable"]

PREFIX = "gwan"  # every namespace this module makes is named gwan-<pid>-<tag>-...
SUBNET = "10.77.0"


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why shaped links cannot be built here (None when they can)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"{PREFIX}-{os.getpid()}-probe{secrets.token_hex(2)}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def our_namespaces() -> list[str]:
    """Every namespace named by this module (of any run)."""
    out = _run("ip", "netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX + "-")]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete the namespaces of runs whose creating process is gone; returns their names."""
    removed = []
    for name in our_namespaces():
        parts = name.split("-")
        if len(parts) >= 2 and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


def netem_available() -> bool:
    """Whether ``tc qdisc add ... netem`` works (probed on a veth inside a scratch namespace)."""
    ns = f"{PREFIX}-{os.getpid()}-netem{secrets.token_hex(2)}"
    _run("ip", "netns", "add", ns)
    try:
        _run("ip", "-n", ns, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
        return _run("tc", "-n", ns, "qdisc", "add", "dev", "probe0", "root", "netem",
                    "delay", "1ms", check=False).returncode == 0
    finally:
        _run("ip", "netns", "del", ns, check=False)


def default_burst(rate_mbit: float) -> int:
    """The tbf bucket in bytes: at least one 64 KiB GSO segment plus headers, or rate / HZ."""
    return max(64 * 1024 + 2048, int(rate_mbit * 1e6 / 8 / 250))


def _tbf(ns: str, dev: str, rate_mbit: float, parent: Sequence[str], burst: int) -> None:
    # queue: 50 ms of the rate
    _run("tc", "-n", ns, "qdisc", "add", "dev", dev, *parent, "tbf",
         "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "50ms")


class ShapedLan:
    """``n`` ranks in their own namespaces, every link shaped to ``rate_mbit`` both ways.

    Args:
        n: ranks (>= 1).
        rate_mbit: link rate in Mbit/s (> 0), the same up and down for every rank.
        delay_ms: one-way delay added on every rank's uplink with netem (>= 0; > 0 needs
            :func:`netem_available`).
        mtu: every veth's MTU (the bridge follows its ports); 1500 is the default measured
            condition, others (jumbo frames, 9000) are variants.
        gso_max_size: the largest GSO segment every veth end hands down (None: the kernel's
            default, 64 KiB); a small value makes the stack and the tbf handle every packet.
        burst: the tbf bucket in bytes (None: :func:`default_burst`).
    """

    def __init__(self, n: int, rate_mbit: float, *, delay_ms: float = 0.0, mtu: int = 1500,
                 gso_max_size: int | None = None, burst: int | None = None) -> None:
        if not isinstance(n, int) or not 1 <= n <= 250:
            raise ValueError(f"n must be an int in [1, 250], got {n!r}")
        if not rate_mbit > 0:
            raise ValueError(f"rate_mbit must be > 0, got {rate_mbit!r}")
        if not delay_ms >= 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms!r}")
        if not isinstance(mtu, int) or not 68 <= mtu <= 65535:
            raise ValueError(f"mtu must be an int in [68, 65535], got {mtu!r}")
        if gso_max_size is not None and (not isinstance(gso_max_size, int)
                                         or not 1 <= gso_max_size <= 65536):
            raise ValueError(f"gso_max_size must be an int in [1, 65536], got {gso_max_size!r}")
        if burst is not None and (not isinstance(burst, int) or burst < mtu + 14):
            raise ValueError(f"burst must be an int >= mtu + 14 = {mtu + 14} bytes (one frame), "
                             f"got {burst!r}")
        why = unavailable()
        if why is not None:
            raise RuntimeError(why)
        if delay_ms > 0 and not netem_available():
            raise RuntimeError("delay_ms > 0 needs the netem qdisc, which this kernel lacks")
        self.n = n
        self.rate_mbit = rate_mbit
        self.delay_ms = delay_ms
        self.mtu = mtu
        self.gso_max_size = gso_max_size
        self.burst = burst if burst is not None else default_burst(rate_mbit)
        self.tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.bridge_ns = f"{self.tag}-br"
        self.namespaces = [f"{self.tag}-r{i}" for i in range(n)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self._made: list[str] = []
        self._closed = False
        atexit.register(self.close)
        self._old_term = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, _raise_exit)
        except ValueError:  # not the main thread: atexit and close() still clean up
            self._old_term = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    @property
    def mode(self) -> str:
        """What shapes the links: ``tbf`` alone, or ``tbf+netem`` with the delay."""
        return f"tbf+netem {self.delay_ms} ms" if self.delay_ms > 0 else "tbf (bandwidth only)"

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        br = self.bridge_ns
        self._add_ns(br)
        _run("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", br, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(self.namespaces, self.addresses, strict=True)):
            self._add_ns(ns)
            port = f"p{i}"
            # created directly between the two namespaces: never visible in the root namespace
            _run("ip", "link", "add", "eth0", "netns", ns, "type", "veth",
                 "peer", "name", port, "netns", br)
            for where, dev in ((br, port), (ns, "eth0")):
                _run("ip", "-n", where, "link", "set", "dev", dev, "mtu", str(self.mtu))
                if self.gso_max_size is not None:
                    _run("ip", "-n", where, "link", "set", "dev", dev, "gso_max_size",
                         str(self.gso_max_size))
            _run("ip", "-n", br, "link", "set", port, "master", "br0")
            _run("ip", "-n", br, "link", "set", port, "up")
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            if self.delay_ms > 0:
                _run("tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", "handle", "1:",
                     "netem", "delay", f"{self.delay_ms}ms")
                _tbf(ns, "eth0", self.rate_mbit, ("parent", "1:1", "handle", "10:"), self.burst)
            else:
                _tbf(ns, "eth0", self.rate_mbit, ("root",), self.burst)
            _tbf(br, port, self.rate_mbit, ("root",), self.burst)

    def command(self, rank: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside rank ``rank``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[rank], *argv]

    def qdiscs(self) -> str:
        """``tc qdisc show`` of every link end (for the record)."""
        out = [_run("tc", "-n", ns, "qdisc", "show", "dev", "eth0").stdout.strip()
               for ns in self.namespaces]
        out.append(_run("tc", "-n", self.bridge_ns, "qdisc", "show").stdout.strip())
        return "\n".join(out)

    def close(self) -> None:
        """Delete every namespace this object made (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for name in reversed(self._made):
            _run("ip", "netns", "del", name, check=False)
        self._made.clear()
        atexit.unregister(self.close)
        if self._old_term is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, self._old_term)

    def __enter__(self) -> ShapedLan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise_exit(signum: int, frame: object) -> None:
    del frame
    raise SystemExit(128 + signum)
