"""Topology-aware dispatch (TA-MoE; Tutel's and DeepSpeed-MoE's hierarchical all-to-all): experts sharded over
two mesh dims, nodes x ranks per node (``inter`` x ``intra``), and the token all-to-all done in two hops so that
the slow links between nodes carry few, large messages.

Rank (i, j) is ep rank ``i G + j`` (node i, position j in its node): it owns experts ``(i G + j) L ..`` as
``Shard(0)`` on both mesh dims lays them out. A row bound for rank (m, g) travels

1. inside the node, to (i, g): every rank of the node hands position g the rows for every node's g-th rank,
   so (i, g) now holds the node's rows for (m, g), for every m;
2. between nodes, from (i, g) to (m, g): one message per destination node, aggregating what the G ranks of
   node i send there (a flat all-to-all sends G (M - 1) messages across nodes per rank, this hop M - 1, each
   G times larger on average).

Rows arrive ordered by (source node, source position, expert) = (source ep rank, expert), as the flat dispatch
delivers them, so the experts run the same way; the combine retraces both hops. Each hop first exchanges its
counts (an all-to-all of ints on that mesh dim), then the rows (``AllToAllSplits``: backward is the inverse).

Bytes rank (i, j) sends, each row D elements, in forward (backward sends as much again): inside the node, its
rows for other positions (dispatch) and the rows other positions handed it (combine, back to them); between
nodes, node i's rows for (m != i, j) (dispatch) and other nodes' rows for (i, j) (combine): exactly the rows
that cross nodes in the flat dispatch (no row crosses twice); and each hop's counts, ``(G-1) M L`` and
``(M-1) G L`` int64s. Not in a simulated world, and not pipelined in chunks (one pass each way).

Legend: M nodes (inter size), G ranks per node (intra size), L experts per rank, E = M G L, A rows sent, D width.
"""

from __future__ import annotations

from typing import Callable

import torch

from dtensor_plus.collectives import AllToAllSplits, all_to_all_splits

__all__ = ["exchange_hierarchical", "regroup_index"]


def regroup_index(counts: torch.Tensor, perm: tuple[int, ...], rows: int) -> torch.Tensor:
    """``new = old[index]``: ``rows`` rows grouped in the row-major order of the groups of ``counts`` (a tensor
    of group sizes) regrouped into the row-major order of ``counts.permute(perm)``, each group's rows kept in
    order."""
    groups = counts.numel()
    group_R = torch.repeat_interleave(torch.arange(groups, device=counts.device), counts.flatten(), output_size=rows)
    old_group_in_new_order = torch.arange(groups, device=counts.device).view(counts.shape).permute(perm).flatten()
    new_position_G = torch.argsort(old_group_in_new_order)
    return torch.argsort(new_position_G[group_R], stable=True)


def _hop(rows_AD: torch.Tensor, counts: torch.Tensor, mesh, mesh_dim: int):
    """Rows grouped by (peer along ``mesh_dim``, ...) to their peers: (received rows, what came from each peer
    as counts (peers, ...), send splits, receive splits)."""
    peers = counts.shape[0]
    per_peer = counts[0].numel()
    # NOTE: the counts are exchanged first (c10d needs split sizes on the host: .tolist() syncs a device).
    recv = all_to_all_splits(counts.reshape(-1), mesh, mesh_dim, [per_peer] * peers, [per_peer] * peers)
    recv = recv.view(counts.shape)
    send_splits = counts.reshape(peers, -1).sum(1).tolist()
    recv_splits = recv.reshape(peers, -1).sum(1).tolist()
    return AllToAllSplits.apply(rows_AD, mesh, mesh_dim, send_splits, recv_splits), recv, send_splits, recv_splits


def exchange_hierarchical(rows_AD: torch.Tensor, counts_E: torch.Tensor, through: Callable, mesh,
                          inter_mesh_dim: int, intra_mesh_dim: int) -> torch.Tensor:
    """``moe_dispatch._exchange`` in two hops, inside the node then between nodes: the rows (grouped by expert)
    through their experts on their ranks and back, in the same order. ``through(received_RD, counts_nL)`` runs
    this rank's experts on rows received ordered by (source ep rank, expert), ``counts_nL`` of each."""
    M, G = mesh.size(inter_mesh_dim), mesh.size(intra_mesh_dim)
    L = counts_E.numel() // (M * G)
    counts_MGL = counts_E.view(M, G, L)  # by destination (node, position, expert)
    to_peer = regroup_index(counts_MGL, (1, 0, 2), rows_AD.shape[0])
    at_peer, from_peer_GML, send_1, recv_1 = _hop(rows_AD[to_peer], counts_MGL.permute(1, 0, 2), mesh, intra_mesh_dim)
    # at_peer: by (source position, destination node, expert); aggregate by destination node
    to_node = regroup_index(from_peer_GML, (1, 0, 2), at_peer.shape[0])
    arrived, from_node_MGL, send_2, recv_2 = _hop(at_peer[to_node], from_peer_GML.permute(1, 0, 2), mesh,
                                                  inter_mesh_dim)
    out = through(arrived, from_node_MGL.reshape(M * G, L))  # by (source node, source position, expert)
    back_at_peer = AllToAllSplits.apply(out, mesh, inter_mesh_dim, recv_2, send_2)[torch.argsort(to_node)]
    back = AllToAllSplits.apply(back_at_peer, mesh, intra_mesh_dim, recv_1, send_1)
    return back[torch.argsort(to_peer)]
