"""The lab's sites (lab/sites.py): ports below the ephemeral range, and a first start
that moves to new ports when another process took one meanwhile."""

from __future__ import annotations

import socket

import pytest

from lab.sites import PortTaken, Site, _ephemeral_range, free_port


def test_free_ports_are_below_the_ephemeral_range() -> None:
    ephemeral = _ephemeral_range()
    ports = {free_port() for _ in range(20)}
    assert not any(p in ephemeral for p in ports)


def test_a_first_start_moves_off_a_taken_port_and_a_restart_does_not(tmp_path) -> None:
    site = Site("A", tmp_path)
    taken = site.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen(1)
        site.start()
        try:
            assert site.port != taken and site.address == "127.0.0.1:%d" % site.port
            assert site.status()["groups"] == {}
        finally:
            site.stop()
    # Restarted, the site keeps its address (peers know it): a taken port is an error.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", site.port))
        squatter.listen(1)
        with pytest.raises(PortTaken, match="Address already in use"):
            site.start()
