"""The speed study's emulated cluster: namespaces joined through a bridge, shaped links, and
nothing left behind. Skipped where network namespaces cannot be created."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.emulated_cluster import EmulatedCluster, namespaces_available

REASON = namespaces_available()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"no network namespaces here: {REASON}"),
              pytest.mark.slow]

RECEIVER = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], 6123))
server.listen(1)
server.settimeout(30)
connection, _ = server.accept()
received = 0
while True:
    data = connection.recv(1 << 16)
    if not data:
        break
    received += len(data)
print(received)
"""

SENDER = """
import socket, sys, time
for attempt in range(50):  # the receiver may still be starting
    try:
        connection = socket.create_connection((sys.argv[1], 6123), timeout=5)
        break
    except OSError:
        time.sleep(0.1)
connection.sendall(b"x" * int(sys.argv[2]))
connection.close()
"""


def test_nodes_talk_over_links_shaped_to_the_rate_and_the_kernel_counts_the_bytes():
    payload = 3_000_000
    with EmulatedCluster(num_nodes=2, rate_mbit=40) as cluster:
        assert cluster.exists()
        receiver = cluster.popen(
            1, [sys.executable, "-c", RECEIVER, cluster.address(1)], stdout=subprocess.PIPE, text=True
        )
        before = cluster.interface_bytes(0)["tx_bytes"]
        start = time.time()
        sender = cluster.popen(0, [sys.executable, "-c", SENDER, cluster.address(1), str(payload)])
        sender.wait(timeout=60)
        received = int(receiver.communicate(timeout=60)[0])
        elapsed = time.time() - start
        sent_on_wire = cluster.interface_bytes(0)["tx_bytes"] - before
    assert received == payload
    assert payload <= sent_on_wire < payload * 1.1
    megabits_per_second = payload * 8 / 1e6 / elapsed
    assert megabits_per_second < 40 * 1.25  # held to the shaped rate (40 Mbit/s: ~0.6 s)
    assert not cluster.exists()


def test_processes_of_one_node_talk_over_its_loopback_not_its_shaped_link():
    payload = 3_000_000
    with EmulatedCluster(num_nodes=2, rate_mbit=10) as cluster:
        receiver = cluster.popen(
            0, [sys.executable, "-c", RECEIVER, cluster.address(0)], stdout=subprocess.PIPE, text=True
        )
        link, loopback = cluster.interface_bytes(0)["tx_bytes"], cluster.interface_bytes(0, "lo")["tx_bytes"]
        start = time.time()
        sender = cluster.popen(0, [sys.executable, "-c", SENDER, cluster.address(0), str(payload)])
        sender.wait(timeout=60)
        assert int(receiver.communicate(timeout=60)[0]) == payload
        elapsed = time.time() - start
        assert cluster.interface_bytes(0, "lo")["tx_bytes"] - loopback >= payload
        assert cluster.interface_bytes(0)["tx_bytes"] - link < 10_000
    assert elapsed < 2.4  # 10 Mbit/s would take 2.4 s


def test_everything_is_removed_when_the_body_fails():
    cluster = EmulatedCluster(num_nodes=2, rate_mbit=100)
    with pytest.raises(RuntimeError, match="boom"):
        with cluster:
            assert cluster.exists()
            raise RuntimeError("boom")
    assert not cluster.exists()


def test_everything_is_removed_on_sigterm(tmp_path):
    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from benchmarks.emulated_cluster import EmulatedCluster
with EmulatedCluster(num_nodes=2, rate_mbit=100) as cluster:
    print(" ".join([cluster.hub, *cluster.nodes]), flush=True)
    time.sleep(60)
"""
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    names = process.stdout.readline().split()
    assert len(names) == 3
    process.terminate()
    process.wait(timeout=30)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not {line.split()[0] for line in listed.splitlines() if line.strip()} & set(names)
