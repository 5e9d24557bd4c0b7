"""The zero-bubble split of one stage's backward: B (gradient of the stage input) now, W (weight gradients) later.

Every path in a stage's autograd graph from its output to a parameter leaves the set I of nodes that can reach
the stage input exactly once: along a *cut edge* n -> m with n in I (a *cut parent*) and m outside it (once a
node cannot reach the input, none below it can). B runs the engine once, from the output to the input, and in
the same call captures the gradient arriving over every cut edge, at its child m (an input GradientEdge of m:
m does not run; a leaf's tensor hooks run on what arrives at its AccumulateGrad, as ``autograd.grad`` runs
them). So B executes exactly the nodes of I, and W runs, in **one** engine call, every cut child's subgraph
from the captured gradients: the parameters' AccumulateGrad nodes (``.grad`` accumulates, post-accumulate hooks
fire as in an ordinary backward; the tensor hooks, which ran in B, muted), their views and transposes. No node
runs twice and nothing is counted twice, whatever the graph (a parameter used twice simply receives two
gradients), and W walks only the small subgraphs below the cut. Where an AccumulateGrad would only add (a plain
parameter, no hooks), W adds the gradient into ``.grad`` itself, all of them in one ``_foreach_add_``: cheaper
than the engine's node (B + W against the fused backward: `benchmarks/pipeline.py --split-cost`).

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


_MATMUL_SLOTS = {"AddmmBackward0": 2, "MmBackward0": 1}  # the slot of mat2 (a linear layer's weight.t())


def _deferrable(node, slot: int, child) -> tuple[torch.Tensor, bool] | None:
    """(saved mat1, mat2 column-major) when cut edge ``slot`` of ``node`` is a linear layer's weight-gradient matmul
    that W can compute from the node's saved tensors as the engine would; None otherwise."""
    kind = type(node).__name__
    if _MATMUL_SLOTS.get(kind) != slot or type(child).__name__ != "TBackward0":  # only a plain weight.t(): other
        return None  # mat2's stay with the engine
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


def _record_plan(root_node, leaf_node, on_input_path) -> tuple:
    """The walk of the input path as data, for the next microbatches (same model, same graph shape). Nodes are
    numbered in the order they are first reached (the root 0); per node: its type, how many ``next_functions``
    slots it has, the slots leading to a node reached first here (numbered next, in slot order), those leading
    to a node already numbered (``(slot, number)``: the graph joins there), the cut edges' slots with their child's
    type and whether they may be a linear layer's weight matmul (``_deferrable`` decides), and the slots that are
    empty. Every slot is in exactly one of these, so a replay that checks them all sees any edge the recorded
    graph did not have. Also the number of the input's node."""
    nodes, number, index = [root_node], {root_node: 0}, 0
    while index < len(nodes):
        node = nodes[index]
        new, joins, cuts, empty = [], [], [], []
        for k, (child, _) in enumerate(node.next_functions):
            if child is None:
                empty.append(k)
            elif child not in on_input_path:
                cuts.append((k, type(child), _MATMUL_SLOTS.get(type(node).__name__) == k
                             and type(child).__name__ == "TBackward0"))
            elif child in number:
                joins.append((k, number[child]))
            else:
                number[child] = len(nodes)
                nodes.append(child)
                new.append(k)
        nodes[index] = (type(node), len(node.next_functions), tuple(new), tuple(joins), tuple(cuts), tuple(empty))
        index += 1
    return tuple(nodes), number[leaf_node]


def _cut_edges(root_node, leaf_node, plan) -> tuple[list, list] | None:
    """The cut edges of this graph, walking only its input path as ``plan`` says (each node's ``next_functions``
    read once, every slot checked against the recording): (the GradientEdges of those to capture, the
    ``(parent, slot, child, input_nr)`` of those that may be weight matmuls); None when the graph does not have the
    plan's shape (a node's type or slots differ, the input is not where it was, or a cut edge's subgraph reaches
    the input path): then the caller walks it all and records anew."""
    steps, leaf_number = plan
    nodes, captured, matmuls = [root_node], [], []
    for index, (kind, num_slots, new, joins, cut, empty) in enumerate(steps):
        node = nodes[index]
        if type(node) is not kind:
            return None
        slots = node.next_functions
        if len(slots) != num_slots:
            return None
        for k in new:  # its type is checked when its own step comes
            nodes.append(slots[k][0])
        for k, number in joins:
            if slots[k][0] is not nodes[number]:
                return None
        for k, child_kind, matmul in cut:
            child, input_nr = slots[k]
            if type(child) is not child_kind:
                return None
            if matmul:
                matmuls.append((node, k, child, input_nr))
            else:
                captured.append(GradientEdge(child, input_nr))
        for k in empty:
            if slots[k][0] is not None:
                return None
    if nodes[leaf_number] is not leaf_node:
        return None
    on_path = set(nodes)  # nothing under a cut edge may lead back to the input path (a leaf's node has no edges)
    children = [edge.node for edge in captured] + [c for _, _, c, _ in matmuls]
    below, stack = set(), [c for c in children if type(c) is not _AccumulateGrad]
    while stack:
        node = stack.pop()
        if node in on_path:
            return None
        if node not in below:
            below.add(node)
            stack += [c for c, _ in node.next_functions if c is not None]
    return captured, matmuls


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
        plans["walk"] = _record_plan(root.grad_fn, leaf_node, on_input_path)
        cuts = _cut_edges(root.grad_fn, leaf_node, plans["walk"])
    captured, deferred = cuts[0], []  # cut edges whose gradient B captures; deferred matmuls
    for n, slot, child, nr in cuts[1]:
        how = _deferrable(n, slot, child)
        if how is None:
            captured.append(GradientEdge(child, nr))
        else:
            deferred.append((GradientEdge(child, nr), n, *how))
    captures = dict.fromkeys(captured)  # one capture per edge: the engine sums what arrives over several
    if deferred and captures:  # a weight whose t() leads into a captured edge too (a weight used twice) is not
        # deferred: its gradient joins the captured sum in B, so the weight's tensor hooks run once, on the sum
        deferred = [d for d in deferred if GradientEdge(*d[0].node.next_functions[0]) not in captures]
    matmul_nodes = list(dict.fromkeys(n for _, n, _, _ in deferred))
    wanted = [input_leaf, *captures, *(GradientEdge(n, 0) for n in matmul_nodes)]
    grads = torch.autograd.grad(root, wanted, root_grad, allow_unused=True)
    at_capture, at_node = grads[1:1 + len(captures)], dict(zip(matmul_nodes, grads[1 + len(captures):]))
    state = SplitBackward(captured={edge: g for edge, g in zip(captures, at_capture) if g is not None},
                          deferred=[(edge, at_node[n], mat1, column_major) for edge, n, mat1, column_major in deferred
                                    if at_node[n] is not None])
    return grads[0] if grads[0] is not None else torch.zeros_like(input_leaf), state


def backward_weight(state: SplitBackward) -> None:
    """W: the deferred weight-gradient matmuls and the captured gradients, each added into its parameter's
    ``.grad``: directly where that is all the engine's AccumulateGrad node would do (``_plain_leaf``), else by one
    engine call from those cut edges (post-accumulate hooks fire inside it). A leaf's tensor hooks ran on a
    gradient B captured at its AccumulateGrad, so they are muted for that call (the engine would run them twice;
    a leaf reached both there and through another captured subgraph, e.g. a weight used once directly and once
    through an ``expand``, would have the second part unhooked: B does not split such a leaf's sum). Frees what B
    kept."""
    if state.root is not None:  # B had nothing to do: W is the stage's whole backward, as BW runs it
        torch.autograd.backward(state.root, state.root_grad)
        state.root = state.root_grad = None
        return
    engine, direct = {}, {}  # cut edge -> gradient; id(leaf) -> [leaf, gradient, owned by W]
    with torch.no_grad():  # a saved mat1 may require grad: W's matmuls record no graph
        for edge, grad, mat1, column_major in state.deferred:
            leaf = _plain_leaf(edge.node.next_functions[0][0]) if column_major else None
            if leaf is not None and leaf.dtype == grad.dtype:  # weight.t() of a plain leaf: add the weight's own
                _add(direct, leaf, grad.t().mm(mat1), owned=True)  # gradient, (grad^T mat1^T)^T^T, the same bits
            else:
                g = grad.t().mm(mat1).t() if column_major else mat1.t().mm(grad)
                engine[edge] = engine[edge] + g if edge in engine else g
        for edge, grad in state.captured.items():
            leaf = _plain_leaf(edge.node)
            if leaf is not None and leaf.dtype == grad.dtype and grad.layout == torch.strided:
                _add(direct, leaf, grad, owned=False)
            else:
                engine[edge] = engine[edge] + grad if edge in engine else grad
        _accumulate(direct.values())
    state.captured, state.deferred = {}, []
    if engine:
        muted = [(hooks, dict(hooks)) for hooks in {id(h): h for h in (
            edge.node.variable._backward_hooks for edge in engine if type(edge.node) is _AccumulateGrad) if h}.values()]
        for hooks, _ in muted:  # the engine's hook holds this very dict: emptied, it runs nothing
            hooks.clear()
        try:
            # The engine is called directly: torch.autograd.backward's checks of each GradientEdge's shape
            # (symbolic-shape helpers, ~0.1 ms a call) would cost more than this call at small sizes. Arguments:
            # keep_graph, create_graph, inputs (none: every leaf reached accumulates, as a plain backward does),
            # allow_unreachable, accumulate_grad.
            _engine_run_backward(tuple(engine), tuple(engine.values()), False, False, (), True, True)
        finally:
            for hooks, items in muted:
                hooks.update(items)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_leaf(node) -> torch.Tensor | None:
    """The leaf whose AccumulateGrad ``node`` would only do ``.grad += gradient`` (or take it as ``.grad`` when
    there is none), so W adds the gradient itself: ~5 us a parameter in one ``_foreach_add_`` against ~15 us for
    each engine node (a GPT stage on CPU: 67 parameters, 1 ms), what brings B + W near the fused backward's cost.
    None where the node does more (the engine runs it): a tensor subclass (DTensor), hooks on the tensor
    (``register_hook``, post-accumulate hooks: data parallelism's buckets, which queue engine callbacks), a
    non-contiguous leaf (the gradient's strides follow it), a gradient held in another layout. Hooks registered
    on the AccumulateGrad node itself rather than on the tensor cannot be seen from Python; torch's
    DistributedDataParallel registers its reducer's so, and ``PipelineSchedule`` refuses a DDP-wrapped stage under
    a B/W schedule (``replicate`` hooks the tensor)."""
    if type(node) is not _AccumulateGrad:
        return None
    leaf = node.variable
    if type(leaf) not in _PLAIN or leaf._backward_hooks or leaf._post_accumulate_grad_hooks or not leaf.is_contiguous():
        return None
    held = leaf.grad
    if held is not None and (type(held) is not torch.Tensor or held.layout != torch.strided):
        return None
    return leaf


def _add(direct: dict, leaf: torch.Tensor, grad: torch.Tensor, owned: bool) -> None:
    """Collect ``grad`` for ``leaf``; a leaf reached twice (a weight used twice) gets the sum, as the engine's input
    buffer sums a node's inputs before AccumulateGrad runs."""
    key = id(leaf)
    if key in direct:
        direct[key] = [leaf, direct[key][1] + grad, True]
    else:
        direct[key] = [leaf, grad, owned]


def _accumulate(entries) -> None:
    """``.grad += gradient`` for each plain ``[leaf, gradient, owned]``, as AccumulateGrad does it: the first
    gradient becomes ``.grad`` (taken when W made it contiguous, else copied: a captured gradient may be the very
    tensor B returned for the input), the next ones add in place, all in one call."""
    held, added = [], []
    for leaf, grad, owned in entries:
        if leaf.grad is None:
            leaf.grad = grad if owned and grad.is_contiguous() else grad.clone(memory_format=torch.contiguous_format)
        else:
            held.append(leaf.grad)
            added.append(grad)
    if held:
        torch._foreach_add_(held, added)
