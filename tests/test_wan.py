"""Shaped links (benchmarks/netns.py) and the WAN benchmark's model side (benchmarks/wan.py).

The namespace tests need root and ``ip netns``; elsewhere they skip with the reason.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time

import pytest

from benchmarks import netns
from benchmarks.wan import main, predict, run_world
from simulations.network import NetworkModel

WHY = netns.unavailable()
needs_netns = pytest.mark.skipif(WHY is not None, reason=f"shaped links unavailable: {WHY}")

MBIT = 100.0
BANDWIDTH = MBIT * 1e6 / 8  # bytes/s


def new_root_links_of_ours(before: set[str]) -> set[str]:
    """Links named as the harness names its own (bridge, bridge ports, probe veths) that
    appeared in the root namespace since ``before`` (others' processes may add other links)."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    now = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}
    return {n for n in now - before if re.fullmatch(r"br0|p\d+|probe[01]", n)}


def test_bad_lan_config_is_refused_before_anything_is_made() -> None:
    with pytest.raises(ValueError, match="n must be"):
        netns.ShapedLan(0, MBIT)
    with pytest.raises(ValueError, match="rate_mbit must be > 0, got -1"):
        netns.ShapedLan(2, -1)
    with pytest.raises(ValueError, match="delay_ms must be >= 0"):
        netns.ShapedLan(2, MBIT, delay_ms=-5)
    with pytest.raises(ValueError, match="mtu must be an int in \\[68, 65535\\], got 9"):
        netns.ShapedLan(2, MBIT, mtu=9)
    with pytest.raises(ValueError, match=r"gso_max_size must be .*got 0"):
        netns.ShapedLan(2, MBIT, gso_max_size=0)
    with pytest.raises(ValueError, match="burst must be an int >= mtu \\+ 14 = 1514 bytes"):
        netns.ShapedLan(2, MBIT, burst=1000)


@pytest.mark.parametrize("value", ["-5", "nan"])
def test_bad_inner_sleep_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--inner-sleep-ms", value])
    assert f"--inner-sleep-ms must be >= 0, got {float(value)}" in capsys.readouterr().err


@needs_netns
def test_variants_are_set_on_every_link_end() -> None:
    """--mtu, --gso-max-size and --tbf-burst reach both ends of every veth (and only then)."""
    with netns.ShapedLan(2, MBIT, mtu=9000, gso_max_size=16384, burst=100000) as lan:
        for ns, dev in ((lan.namespaces[1], "eth0"), (lan.bridge_ns, "p1")):
            link = subprocess.run(["ip", "-n", ns, "-d", "link", "show", "dev", dev],
                                  capture_output=True, text=True, check=True).stdout
            assert "mtu 9000" in link and "gso_max_size 16384" in link, link
        assert lan.qdiscs().count("burst 100000b") == 4, lan.qdiscs()  # 2 ranks x 2 ends


@pytest.mark.parametrize("n", [4, 8])
def test_model_side_matches_closed_forms(n: int) -> None:
    """The prediction runs the algorithm on stacked rows and feeds its events to SimClock:
    DiLoCo/FedAvg cost one ring all-reduce, NoLoCo one message each way in pairs, D-PSGD on a
    ring two messages through each uplink, int8 a quarter of the bytes plus its scales."""
    numel = 4096
    nbytes = 4 * numel
    model = NetworkModel(latency=0.0, bandwidth=BANDWIDTH, compute_time=0.0)
    ring = 2 * (n - 1) / n * nbytes / BANDWIDTH
    for case in ("fedavg", "diloco", "raw_allreduce"):
        assert predict(case, n, numel, model)[0] == pytest.approx(ring, rel=1e-9)
    for case in ("noloco", "raw_send", "raw_pair_recvs_first"):
        assert predict(case, n, numel, model)[0] == pytest.approx(nbytes / BANDWIDTH, rel=1e-9)
    for case in ("raw_alltoall", "raw_alltoall_p2p"):  # n - 1 chunks of numel / n bytes out
        assert predict(case, n, numel, model)[0] == pytest.approx(
            (n - 1) * (numel // n) / BANDWIDTH, rel=1e-9)
    for case in ("dpsgd", "raw_ring"):  # two messages through each uplink
        assert predict(case, n, numel, model)[0] == pytest.approx(2 * nbytes / BANDWIDTH,
                                                                  rel=1e-9)
    seconds, sent = predict("diloco:int8", n, numel, model)
    assert 0.25 < seconds / ring < 0.3  # int8 + one fp32 scale per chunk
    assert sent == pytest.approx(seconds * BANDWIDTH, rel=1e-9)


@needs_netns
def test_a_failing_build_and_a_dead_run_leave_nothing_behind() -> None:
    before = new_root_links_of_ours(set())
    with pytest.raises(RuntimeError, match="boom"), netns.ShapedLan(2, MBIT) as lan:
        made = [lan.bridge_ns, *lan.namespaces]
        assert set(made) <= set(netns.our_namespaces())
        raise RuntimeError("boom")
    assert not set(made) & set(netns.our_namespaces())
    # a namespace left by a process that is gone is removed by cleanup_stale
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = f"{netns.PREFIX}-{done.stdout.strip()}-dead-br"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    assert stale in netns.cleanup_stale()
    assert stale not in netns.our_namespaces()
    assert not new_root_links_of_ours(before)  # nothing was made in the root namespace


@pytest.mark.slow
@needs_netns
def test_one_way_transfer_takes_bytes_over_bandwidth() -> None:
    """2 ranks in their own namespaces, 100 Mbit/s tbf both ways, a 1 MiB fp32 buffer sent one
    way over Gloo: the slowest rank's wall time is B / bandwidth (the shaping holds it back;
    TCP/IP headers and the scheduler of a loaded machine add a little)."""
    before = new_root_links_of_ours(set())
    numel = 2**18  # 1 MiB
    opts = {"numel": numel, "cases": ["raw_send"], "repeats": 3, "warmup": 1,
            "rate_mbit": MBIT, "delay_ms": 0.0}
    samples = run_world(2, opts, timeout=240.0)
    measured = statistics.median(samples["raw_send"])
    expected = 4 * numel / BANDWIDTH
    assert 0.85 * expected < measured < 1.75 * expected, (measured, expected)
    assert not [n for n in netns.our_namespaces() if n.split("-")[1] == str(os.getpid())]
    assert not new_root_links_of_ours(before)


def test_cpu_probe_charges_the_calling_thread_and_sums_the_ranks() -> None:
    """0.3 s of CPU spent by this thread shows as the main thread's (to a tick or two); a
    summary adds the ranks' threads and takes the machine's busy time from rank 0."""
    from benchmarks.cpu_probe import difference, snapshot
    from benchmarks.wan import summarize

    before = snapshot("lo")
    t0 = time.thread_time()
    while time.thread_time() - t0 < 0.3:
        pass
    d = difference(before, snapshot("lo"), per=2.0)
    main = d["threads"]["main"]
    assert abs(main["user"] + main["kernel"] - 0.15) <= 0.02, d
    assert sum(d["machine"].values()) >= main["user"] + main["kernel"] - 0.02, d
    s = summarize([d, d])
    assert s["main_user"] == round(2 * main["user"], 3)
    assert s["machine_busy"] == round(sum(v for k, v in d["machine"].items()
                                          if k not in ("idle", "iowait")), 3)
