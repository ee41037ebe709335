"""The lab network's own checks, before it touches the machine's network."""

from __future__ import annotations

import pytest

from fedge import netlab
from fedge.netlab import Lab, in_netns


def test_bad_sizes_are_refused_before_anything_is_made() -> None:
    for nodes in (0, 201):
        with pytest.raises(ValueError, match=f"a lab has 1 to 200 nodes, got {nodes}"):
            Lab(nodes)


@pytest.mark.skipif(bool(netlab.unavailable()), reason=netlab.unavailable() or "ok")
def test_a_loss_outside_0_to_100_percent_is_refused() -> None:
    with Lab(1) as lab:
        for percent in (0, 100, 150):
            with pytest.raises(ValueError, match="loss is a percentage in"):
                lab.loss(percent)


def test_a_command_runs_here_or_in_a_namespace() -> None:
    assert in_netns(None) == []
    assert in_netns("lab-n0") == ["ip", "netns", "exec", "lab-n0"]
