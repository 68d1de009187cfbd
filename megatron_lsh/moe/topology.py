"""Which expert-parallel peers share a node: the all-to-all's rows to them cross fast links
(NVLink, loopback), its rows to the others the slow inter-node network.

Ranks are laid out node by node, as torchrun numbers them (global rank = node rank x processes
per node + local rank), so a rank's node is its global rank over the processes per node.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch

LSH_SCOPES = ("all", "inter-node")


def ranks_per_node(configured: Optional[int] = None) -> int:
    """Processes per node: ``configured``, else torchrun's LOCAL_WORLD_SIZE, else every rank on
    one node (a single process, or a launcher that does not say)."""
    if configured:
        return configured
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def nodes_of_group(group, processes_per_node: int) -> List[int]:
    """The node of each rank of ``group``, in group-rank order."""
    if group is None or not torch.distributed.is_initialized():
        return [0]
    return [rank // processes_per_node for rank in torch.distributed.get_process_group_ranks(group)]
