"""A lab network of Linux network namespaces, for fault drills on one machine.

The hub namespace holds the server and the broker; each node gets a namespace of its
own, joined to the hub by a veth pair whose hub end is a port of the hub's bridge. This
process (the operator) reaches the hub over one more veth that faults never touch, so
it can watch a run while the nodes' links fail. Faults are what a real network does to
packets: nftables rules that drop a share of them on receipt (loss), and links taken
down (``ip link set down``) on either side (a partition, a device gone offline).

Needs root, iproute2 and nftables (`make test` installs them: scripts/system-deps.sh).
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess

from fedge.errors import FedgeError

TABLE = "fedge_lab"


def in_netns(netns: str | None) -> list[str]:
    """The command prefix that runs a program in network namespace `netns` (none: here)."""
    return ["ip", "netns", "exec", netns] if netns else []


def unavailable() -> str:
    """Why this machine cannot build a lab network, or "" when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (scripts/system-deps.sh installs them)"
    return ""


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise FedgeError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")


class Lab:
    """A hub and `nodes` node namespaces on a private /24 that no interface here uses.

    Names carry a random tag, so labs of concurrent tests never meet; `close` removes
    every namespace and interface the lab made."""

    def __init__(self, nodes: int) -> None:
        if not 1 <= nodes <= 200:
            raise ValueError(f"a lab has 1 to 200 nodes, got {nodes}")
        if why := unavailable():
            raise FedgeError(f"cannot build a lab network: {why}")
        self.tag = f"{random.getrandbits(16):04x}"
        self.hub = f"fedge-{self.tag}-hub"
        self.nodes = [f"fedge-{self.tag}-n{i}" for i in range(nodes)]
        self._net = self._free_subnet()
        hosts = list(self._net.hosts())
        self.hub_address = str(hosts[0])
        self.operator_address = str(hosts[-1])
        self.node_addresses = [str(hosts[9 + i]) for i in range(nodes)]
        self._operator = f"fl{self.tag}op"
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- building ---------------------------------------------------------------------

    @staticmethod
    def _free_subnet() -> ipaddress.IPv4Network:
        used = subprocess.run(
            ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
        ).stdout
        taken = [ipaddress.IPv4Interface(word).network for word in used.split() if "/" in word]
        for _ in range(100):
            net = ipaddress.IPv4Network(
                f"10.{random.randint(64, 250)}.{random.randint(0, 255)}.0/24"
            )
            if not any(net.overlaps(other) for other in taken):
                return net
        raise FedgeError("no free 10.x.y.0/24 subnet for a lab network")

    def _ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _port(self, here: str, there: str, netns: str | None, name: str, address: str) -> None:
        """A veth pair: `here` joins the hub's bridge, `there` goes to `netns` (None:
        stays in this namespace) as `name` with `address`."""
        _run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        _run("ip", "link", "set", here, "netns", self.hub)
        _run("ip", "-n", self.hub, "link", "set", here, "master", "br0", "up")
        prefix = ["ip"] if netns is None else ["ip", "-n", netns]
        if netns is not None:
            _run("ip", "link", "set", there, "netns", netns)
            _run(*prefix, "link", "set", there, "name", name)
        _run(*prefix, "addr", "add", f"{address}/24", "dev", name)
        _run(*prefix, "link", "set", name, "up")

    def _build(self) -> None:
        self._ns(self.hub)
        _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.hub, "addr", "add", f"{self.hub_address}/24", "dev", "br0")
        _run("ip", "-n", self.hub, "link", "set", "br0", "up")
        self._port(f"fl{self.tag}oh", self._operator, None, self._operator, self.operator_address)
        for i, netns in enumerate(self.nodes):
            self._ns(netns)
            self._port(
                self._hub_port(i), f"fl{self.tag}n{i}", netns, "eth0", self.node_addresses[i]
            )

    def _hub_port(self, node: int) -> str:
        return f"fl{self.tag}h{node}"

    def close(self) -> None:
        for netns in reversed(self._made):  # its interfaces go with it
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
        self._made.clear()
        subprocess.run(["ip", "link", "del", self._operator], capture_output=True, check=False)

    # --- faults -----------------------------------------------------------------------

    def loss(self, percent: int, nodes: list[int] | None = None) -> None:
        """Drop `percent` % of the packets each way between the hub and `nodes` (all by
        default), on receipt, as a lossy link does: the node drops what the hub sends,
        the hub what the node sends. `clear_loss` ends it."""
        if not 0 < percent < 100:
            raise ValueError(f"loss is a percentage in (0, 100), got {percent}")
        chosen = range(len(self.nodes)) if nodes is None else nodes
        sources = ", ".join(self.node_addresses[i] for i in chosen)
        self._rules(self.hub, f"ip saddr {{ {sources} }} numgen random mod 100 < {percent} drop")
        for i in chosen:
            self._rules(self.nodes[i], f"numgen random mod 100 < {percent} drop")

    def clear_loss(self) -> None:
        for netns in (self.hub, *self.nodes):
            subprocess.run(
                ["ip", "netns", "exec", netns, "nft", "delete", "table", "inet", TABLE],
                capture_output=True,
                check=False,
            )

    def _rules(self, netns: str, rule: str) -> None:
        script = (
            f"table inet {TABLE} {{\n chain input {{\n"
            f"  type filter hook input priority 0; policy accept;\n  {rule}\n }}\n}}\n"
        )
        done = subprocess.run(
            [*in_netns(netns), "nft", "-f", "-"], input=script, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise FedgeError(f"nft in {netns} refused {rule!r}: {done.stderr.strip()}")

    def partition(self, up: bool = False) -> None:
        """Cut (or, with `up`, restore) every node's link at the hub: the network
        between them fails while the devices keep their own interfaces."""
        for i in range(len(self.nodes)):
            _run("ip", "-n", self.hub, "link", "set", self._hub_port(i), "up" if up else "down")

    def offline(self, node: int, up: bool = False) -> None:
        """Take node `node`'s own interface down (or, with `up`, back up): the device
        goes offline."""
        _run("ip", "-n", self.nodes[node], "link", "set", "eth0", "up" if up else "down")
