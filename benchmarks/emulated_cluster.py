"""N emulated nodes on one machine: Linux network namespaces joined by veth pairs through a bridge,
every link rate-limited with `tc` (token bucket, both directions).

    with EmulatedCluster(num_nodes=2, rate_mbit=1000) as cluster:
        cluster.popen(0, ["python", "-c", "..."])      # runs inside node 0's namespace
        cluster.address(1)                             # 10.213.0.2
        cluster.interface_bytes(0)                     # kernel counters of node 0's link
        cluster.interface_bytes(0, "lo")               # ... of its loopback (its processes' traffic)

Several processes of one node (torchrun --nproc_per_node=P inside its namespace) talk to each
other over the node's loopback, unshaped, as GPUs of one machine do over NVLink; only traffic
between nodes crosses the shaped links.

Everything it creates (namespaces, veth pairs, bridge, qdiscs) lives in namespaces named after
this process, and is removed on exit, on error, on Ctrl-C and on SIGTERM. It only ever uses the
addresses it assigns itself. Needs root (CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Dict, List, Optional

SUBNET = "10.213.0"


class ClusterUnavailable(RuntimeError):
    """Namespaces cannot be created here (no root, no iproute2, or a sandbox forbids it)."""


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=30)


def namespaces_available() -> Optional[str]:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) for network namespaces"
    probe = f"lshprobe{os.getpid()}"
    try:
        result = _run("ip", "netns", "add", probe, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as error:
        return f"iproute2 unusable: {error}"
    if result.returncode != 0:
        return f"ip netns add failed: {result.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


class EmulatedCluster:
    def __init__(self, num_nodes: int, rate_mbit: float, burst_kbit: int = 512, latency_ms: float = 50.0):
        if not 1 <= num_nodes <= 200:
            raise ValueError("num_nodes must be between 1 and 200")
        self.num_nodes = num_nodes
        self.rate_mbit = rate_mbit
        self.burst_kbit = burst_kbit
        self.latency_ms = latency_ms
        tag = os.getpid() % 100000
        self.hub = f"lsh{tag}hub"
        self.nodes = [f"lsh{tag}n{i}" for i in range(num_nodes)]
        self._created: List[str] = []
        self._previous_sigterm = None

    # -- set-up and teardown -----------------------------------------------------------------

    def __enter__(self) -> "EmulatedCluster":
        reason = namespaces_available()
        if reason:
            raise ClusterUnavailable(reason)
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _on_sigterm(self, signum, frame):
        raise SystemExit(f"terminated by signal {signum}")

    def _netns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._created.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _shape(self, namespace: str, device: str) -> None:
        _run("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf",
             "rate", f"{self.rate_mbit}mbit", "burst", f"{self.burst_kbit}kbit",
             "latency", f"{self.latency_ms}ms")

    def _build(self) -> None:
        self._netns(self.hub)
        _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, node in enumerate(self.nodes):
            self._netns(node)
            # Create the pair inside the hub, then move one end into the node as eth0.
            _run("ip", "-n", self.hub, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", node)
            _run("ip", "-n", self.hub, "link", "set", f"v{i}", "master", "br0")
            _run("ip", "-n", self.hub, "link", "set", f"v{i}", "up")
            _run("ip", "-n", node, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _run("ip", "-n", node, "link", "set", "eth0", "up")
            self._shape(node, "eth0")  # what the node sends
            self._shape(self.hub, f"v{i}")  # what it receives

    def teardown(self) -> None:
        """Remove every namespace made (their veth ends and qdiscs go with them). Idempotent."""
        for name in reversed(self._created):
            _run("ip", "netns", "del", name, check=False)
        self._created = []
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def exists(self) -> bool:
        """Whether any of this cluster's namespaces is present."""
        listed = _run("ip", "netns", "list", check=False).stdout.splitlines()
        present = {line.split()[0] for line in listed if line.strip()}
        return bool(present & {self.hub, *self.nodes})

    # -- use -----------------------------------------------------------------------------------

    def address(self, node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    def command(self, node: int, argv: List[str]) -> List[str]:
        return ["ip", "netns", "exec", self.nodes[node], *argv]

    def popen(self, node: int, argv: List[str], env: Optional[Dict[str, str]] = None, **kwargs) -> subprocess.Popen:
        """Start argv inside node's namespace; gloo is pointed at the node's link."""
        environment = dict(os.environ if env is None else env, GLOO_SOCKET_IFNAME="eth0")
        return subprocess.Popen(self.command(node, argv), env=environment, **kwargs)

    def interface_bytes(self, node: int, device: str = "eth0") -> Dict[str, int]:
        """The kernel's tx/rx byte counters of node's link (eth0) or of its loopback (lo)."""
        counters = {}
        for name in ("tx_bytes", "rx_bytes"):
            result = _run("ip", "netns", "exec", self.nodes[node], "cat", f"/sys/class/net/{device}/statistics/{name}")
            counters[name] = int(result.stdout.strip())
        return counters
