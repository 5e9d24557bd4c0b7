"""The zero-bubble split of one stage's backward: B (gradient of the stage input) now, W (weight gradients) later.

Every path in a stage's autograd graph from its output to a parameter leaves the set I of nodes that can reach
the stage input exactly once: along a *cut edge* n -> m with n in I (a *cut parent*) and m outside it (once a
node cannot reach the input, none below it can). B runs the engine once, from the output to the input, and in
the same call captures the gradient arriving over every cut edge, at its child m (an input GradientEdge of m:
m does not run, no Python hook runs inside the backward). So B executes exactly the nodes of I, and W runs,
in **one** engine call, every cut child's subgraph from the captured gradients: the parameters' AccumulateGrad
nodes (``.grad`` accumulates, post-accumulate hooks fire as in an ordinary backward), their views and
transposes. No node runs twice and nothing is counted twice, whatever the graph (a parameter used twice
simply receives two gradients), and W walks only the small subgraphs below the cut.

Which work lands in W: the engine computes only the outputs of a node that some captured edge or the input
needs, so a cut parent computes its cut outputs in B. For the matmul of a linear layer (``AddmmBackward0``,
``MmBackward0``: the weight is mat2, its cut edge leads to a ``TBackward0``) that output is the weight-gradient
matmul, the FLOPs the zero-bubble schedules move to W. So those edges are *deferred* instead: B captures the
gradient arriving at the matmul node itself (it then computes only its input gradient), keeps a reference to
the node's saved mat1 (the layer input), and W computes ``mat1^T @ grad`` exactly as the engine's formula does
(same ops, same transposition: the same bits) and feeds it into the cut edge with the rest. What stays in B
are the small cut outputs: biases, norm weights (O(rows x dim) reductions), as in the zero-bubble paper's
implementation, which defers the weight GEMMs of linear layers.

B runs without ``retain_graph``: the input path's saved activations are freed at B; W keeps only the layer
inputs of the deferred matmuls and the cut subgraphs (which hold no activations of their own here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge
# The engine entry torch.autograd.backward calls after checking its arguments (private; torch is pinned).
from torch.autograd.graph import _engine_run_backward

_AccumulateGrad = torch._C._functions.AccumulateGrad  # the node through which a leaf receives its gradient

__all__ = ["SplitBackward", "backward_input", "backward_weight"]


@dataclass
class SplitBackward:
    """What B leaves for W: the cut edges with their captured gradients, the deferred weight-gradient matmuls, or
    the root for the no-input fallback."""

    root: torch.Tensor | None = None  # no differentiable input: W is the whole backward (None once W ran)
    root_grad: torch.Tensor | None = None
    # {(cut child node, its input_nr): captured gradient}: W's engine roots
    captured: dict = field(default_factory=dict)
    # [((cut child node, its input_nr), gradient at the matmul node, saved mat1, mat2 was column-major)]
    deferred: list = field(default_factory=list)


def _input_path(root_node, target) -> tuple[dict, set, list]:
    """One iterative post-order walk of the graph below ``root_node`` (graphs are deep): every node's (child,
    input_nr) edges, ``next_functions`` read once per node (each read builds new Python tuples), and the nodes
    from which ``target`` can be reached (target included), each decided once its children are, and those nodes
    in that order (children before parents; ``target`` left out)."""
    kids = [(c, nr) for c, nr in root_node.next_functions if c is not None]
    children, reach, order, stack = {root_node: kids}, {target}, [], [(root_node, kids, 0)]
    while stack:
        node, kids, i = stack.pop()
        while i < len(kids) and kids[i][0] in children:
            i += 1
        if i < len(kids):  # an unvisited child: come back to this node after it
            stack.append((node, kids, i + 1))
            child = kids[i][0]
            grandkids = [(c, nr) for c, nr in child.next_functions if c is not None]
            children[child] = grandkids
            stack.append((child, grandkids, 0))
        elif any(c in reach for c, _ in kids):
            reach.add(node)
            order.append(node)
    return children, reach, order


def _deferrable(node, slot: int, child) -> tuple[torch.Tensor, bool] | None:
    """(saved mat1, mat2 column-major) when cut edge ``slot`` of ``node`` is a linear layer's weight-gradient matmul
    that W can compute from the node's saved tensors as the engine would; None otherwise."""
    kind = type(node).__name__
    if not ((kind == "AddmmBackward0" and slot == 2) or (kind == "MmBackward0" and slot == 1)):
        return None
    if type(child).__name__ != "TBackward0":  # only a plain weight.t(): other mat2's stay with the engine
        return None
    if kind == "AddmmBackward0":
        if node._saved_alpha != 1:
            return None
        mat1 = node._saved_mat1
    else:
        mat1 = node._saved_self
    if mat1 is None or mat1.layout != torch.strided or mat1.is_complex():
        return None
    sizes, strides = node._saved_mat2_sym_sizes, node._saved_mat2_sym_strides
    # the engine's mm_mat2_backward: a column-major mat2 (weight.t() of a row-major weight) gets its gradient as
    # (grad^T @ mat1)^T, column-major too; else mat1^T @ grad
    return mat1, strides[0] == 1 and strides[1] == sizes[0]


def _record_plan(root_node, on_input_path) -> tuple:
    """The walk of the input path as data, for the next microbatches (same model, same graph shape): per node in
    depth-first order, its type, which of its ``next_functions`` slots are set, which lead on along the input path
    and which are cut edges."""
    plan, seen, stack = [], {root_node}, [root_node]
    while stack:
        node = stack.pop()
        slots = node.next_functions
        follow = tuple(k for k, (c, _) in enumerate(slots) if c is not None and c in on_input_path)
        cut = tuple(k for k, (c, _) in enumerate(slots) if c is not None and c not in on_input_path)
        plan.append((type(node), tuple(c is not None for c, _ in slots), follow, cut))
        for k in follow:
            child = slots[k][0]
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return tuple(plan)


def _cut_edges(root_node, leaf_node, plan) -> list | None:
    """The cut edges ``(parent, slot, child, input_nr)`` of this graph, walking only its input path as ``plan``
    says; None when the graph does not have the plan's shape (a node's type or set slots differ, the input is not
    reached, or a cut edge's subgraph reaches the input path): then the caller walks it all and records anew."""
    seen, stack, cuts, i = {root_node}, [root_node], [], 0
    while stack:
        node = stack.pop()
        if i == len(plan):
            return None
        kind, present, follow, cut = plan[i]
        i += 1
        slots = node.next_functions
        if type(node) is not kind or tuple(c is not None for c, _ in slots) != present:
            return None
        for k in follow:
            child = slots[k][0]
            if child not in seen:
                seen.add(child)
                stack.append(child)
        cuts += [(node, k, *slots[k]) for k in cut]
    if i != len(plan) or leaf_node not in seen:
        return None
    below, stack = set(), [c for _, _, c, _ in cuts]  # nothing under a cut edge may lead back to the input path
    while stack:
        node = stack.pop()
        if node in seen:
            return None
        if node not in below:
            below.add(node)
            stack += [c for c, _ in node.next_functions if c is not None]
    return cuts


def backward_input(root: torch.Tensor, root_grad, input_leaf, params, plans: dict | None = None
                   ) -> tuple[torch.Tensor | None, SplitBackward]:
    """B: the gradient of ``input_leaf`` (None when the stage has no differentiable input), and the state W needs.

    ``root`` is the stage output (``root_grad`` its gradient) or the scaled loss (``root_grad`` None). ``params``
    (the stage's parameters) is not needed: W accumulates into every leaf its cut edges reach, as a plain backward
    does into every leaf of the graph; kept in the signature for callers. ``plans``: a dict the caller keeps
    across microbatches (a stage's): the input path's walk recorded on the first microbatch, so the next ones walk
    only the input path along it, checking the graph still has its shape (about half the Python of a full walk,
    which is most of B's overhead on small layers)."""
    if root is input_leaf:  # a stage that passes its input through unchanged
        return root_grad, SplitBackward()
    if root.grad_fn is None:
        return None, SplitBackward()
    if input_leaf is None or not input_leaf.requires_grad:
        return None, SplitBackward(root=root, root_grad=root_grad)
    leaf_node = get_gradient_edge(input_leaf).node
    plans = {} if plans is None else plans
    cuts = _cut_edges(root.grad_fn, leaf_node, plans["walk"]) if "walk" in plans else None
    if cuts is None:
        children, on_input_path, _ = _input_path(root.grad_fn, leaf_node)
        if leaf_node not in children:  # the output does not depend on the input
            return torch.zeros_like(input_leaf), SplitBackward(root=root, root_grad=root_grad)
        plans["walk"] = _record_plan(root.grad_fn, on_input_path)
        cuts = _cut_edges(root.grad_fn, leaf_node, plans["walk"])
    captures, deferred = {}, []  # cut edge -> its capture slot; deferred matmuls
    for n, slot, child, nr in cuts:
        how = _deferrable(n, slot, child)
        if how is None:
            captures.setdefault((child, nr), len(captures))
        else:
            deferred.append(((child, nr), n, *how))
    matmul_nodes = list(dict.fromkeys(n for _, n, _, _ in deferred))
    wanted = [input_leaf, *(GradientEdge(m, nr) for m, nr in captures), *(GradientEdge(n, 0) for n in matmul_nodes)]
    grads = torch.autograd.grad(root, wanted, root_grad, allow_unused=True)
    at_capture, at_node = grads[1:1 + len(captures)], dict(zip(matmul_nodes, grads[1 + len(captures):]))
    state = SplitBackward(captured={edge: g for edge, g in zip(captures, at_capture) if g is not None},
                          deferred=[(edge, at_node[n], mat1, column_major) for edge, n, mat1, column_major in deferred
                                    if at_node[n] is not None])
    return grads[0] if grads[0] is not None else torch.zeros_like(input_leaf), state


def backward_weight(state: SplitBackward) -> None:
    """W: the deferred weight-gradient matmuls, then one engine call from every cut edge that accumulates the
    parameter gradients into ``.grad`` (hooks fire). Frees what B kept."""
    if state.root is not None:  # B had nothing to do: W is the stage's whole backward, as BW runs it
        torch.autograd.backward(state.root, state.root_grad)
        state.root = state.root_grad = None
        return
    roots = dict(state.captured)
    for edge, grad, mat1, column_major in state.deferred:
        g = grad.t().mm(mat1).t() if column_major else mat1.t().mm(grad)
        roots[edge] = roots[edge] + g if edge in roots else g
    state.captured, state.deferred = {}, []
    if roots:
        # The engine is called directly: torch.autograd.backward's checks of each GradientEdge's shape
        # (symbolic-shape helpers, ~0.1 ms a call) would cost more than this call at small sizes. Arguments:
        # keep_graph, create_graph, inputs (none: every leaf reached accumulates, as a plain backward does),
        # allow_unreachable, accumulate_grad.
        _engine_run_backward(tuple(GradientEdge(m, nr) for m, nr in roots), tuple(roots.values()), False, False, (),
                             True, True)
