"""The network model's link-rate conversion (simulations.network.tcp_payload_bandwidth)."""

from __future__ import annotations

import pytest

from simulations.network import tcp_payload_bandwidth


def test_payload_rate_is_the_line_rate_less_the_headers_of_each_frame() -> None:
    # MTU 1500 with TCP timestamps: 1448 payload bytes in a 1514-byte Ethernet frame
    assert tcp_payload_bandwidth(100e6) == pytest.approx(12.5e6 * 1448 / 1514, rel=1e-12)
    # jumbo frames: 9000 - 52 payload bytes per 9014
    assert tcp_payload_bandwidth(1e9, mtu=9000) == pytest.approx(125e6 * 8948 / 9014, rel=1e-12)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rate_bits": 0.0}, "rate_bits must be > 0, got 0.0"),
    ({"rate_bits": 1e6, "mtu": 52}, "mtu must be an int > 52"),
])
def test_bad_link_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tcp_payload_bandwidth(**kwargs)
