"""The zero-bubble split of one stage's backward: B (gradient of the stage input) now, W (weight gradients) later.

Every path in a stage's autograd graph from its output to a parameter leaves the set I of nodes that can reach
the stage input exactly once: along a *cut edge* n -> m with n in I and m outside it (once a node cannot reach
the input, none below it can). So

- B runs autograd from the output to the input only. Autograd then skips every output of a node that no path
  to the input needs (a Linear's weight-gradient matmul); the same call captures the gradient arriving at each
  cut parent n (an input GradientEdge per slot of n, so no Python hook runs inside the backward);
- W re-enters the kept graph at the cut parents with their kept gradients and backpropagates them to the
  parameters their cut edges reach (``inputs=`` those parameters): the weight-gradient matmuls skipped in B, and
  the gradients accumulate into ``.grad`` with post-accumulate hooks (data parallel reduction, ZeRO) firing as in
  an ordinary backward. Parents are entered together only when neither reaches the other through the input path
  (grouped by how many parents lie below them): entered with a parent below it, a parent would run through
  that one's input path and count it twice. Each call has a fixed cost and walks the whole graph below its
  parents, so fewer calls is most of what keeps B + W near one fused backward on small layers.

A parameter reached from two cut parents (used twice, e.g. once beside the input path) would make one parent's
W run through the other's input path and count twice. Such graphs take the plain fallback: W runs the whole
backward again restricted to the parameters (``inputs=``): exact, but it costs a second backward.
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
    """What B leaves for W: the kept gradients at the cut parents, or the root for the fallback."""

    root: torch.Tensor | None = None  # fallback: the whole backward again (None once W ran)
    root_grad: torch.Tensor | None = None
    no_input: bool = False  # the fallback because the stage has no differentiable input: W is the plain backward
    params: list = field(default_factory=list)
    # [(cut-parent edges, their kept gradients, the parameter edges they reach)]: one engine call each
    weight_calls: list = field(default_factory=list)


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


def backward_input(root: torch.Tensor, root_grad, input_leaf, params) -> tuple[torch.Tensor | None, SplitBackward]:
    """B: the gradient of ``input_leaf`` (None when the stage has no differentiable input), and the state W needs.

    ``root`` is the stage output (``root_grad`` its gradient) or the scaled loss (``root_grad`` None)."""
    params = [p for p in params if p.requires_grad]
    if root is input_leaf:  # a stage that passes its input through unchanged
        return root_grad, SplitBackward()
    if root.grad_fn is None:
        return None, SplitBackward()
    if input_leaf is None or not input_leaf.requires_grad:
        return None, SplitBackward(root=root, root_grad=root_grad, params=params, no_input=True)
    leaf_node = get_gradient_edge(input_leaf).node
    children, on_input_path, order = _input_path(root.grad_fn, leaf_node)
    if leaf_node not in children:  # the output does not depend on the input
        return torch.zeros_like(input_leaf), SplitBackward(root=root, root_grad=root_grad, params=params)
    owned = _owned_params(children, on_input_path, params)
    if owned is None:  # a parameter reached from two cut parents: the exact split would count it twice
        (grad,) = torch.autograd.grad(root, [input_leaf], root_grad, retain_graph=True)
        return grad, SplitBackward(root=root, root_grad=root_grad, params=params)
    # The gradients arriving at the cut parents are captured by the same engine call as the input's (an input
    # GradientEdge per slot of each parent: no Python hook runs inside the backward); the parents still run, for
    # the input path only.
    nodes = list(owned)
    slots = [(n, k) for n in nodes for k in range(len(n._input_metadata))]
    grads = torch.autograd.grad(root, [input_leaf, *(GradientEdge(n, k) for n, k in slots)], root_grad,
                                retain_graph=True, allow_unused=True)
    kept = {}
    for (n, k), g in zip(slots, grads[1:]):
        if g is not None:
            kept.setdefault(n, {})[k] = g
    grad = grads[0] if grads[0] is not None else torch.zeros_like(input_leaf)
    return grad, SplitBackward(params=params, weight_calls=_weight_calls(order, children, on_input_path, owned, kept))


def _weight_calls(order, children, on_input_path, owned, kept) -> list:
    """W's engine calls: the cut parents grouped by how many cut parents lie below them on the input path (at
    most, along any chain). Two parents of one group never reach each other (a parent above another has more
    below it), so entered together neither runs through the other's input path, and each call asks for
    exactly its parents' parameters: the parallel q, k, v projections of attention share a call."""
    below = {}
    for n in order:  # children first
        below[n] = max((below.get(c, 0) + (c in owned) for c, _ in children[n] if c in on_input_path), default=0)
    groups = {}
    for n, by_slot in kept.items():
        edges, grads, inputs = groups.setdefault(below[n], ([], [], []))
        for k, g in by_slot.items():
            edges.append(GradientEdge(n, k))
            grads.append(g)
        inputs += owned[n]
    return [(tuple(e), tuple(g), tuple(i)) for _, (e, g, i) in sorted(groups.items(), reverse=True)]


def _owned_params(children: dict, on_input_path: set, params) -> dict | None:
    """For each cut parent (a node on the input path with an edge leaving it), the gradient edges of the parameters
    reachable from it through its cut edges; None when some parameter is reachable from two cut parents (the W of
    one would then run through the other's input path). Parents that reach no parameter are left out.

    A parameter shows up as its AccumulateGrad node, recognised by type and its ``variable`` (no
    ``get_gradient_edge`` per parameter: each builds a view); leaves that are not in ``params`` are not W's."""
    param_ids = {id(p) for p in params}
    owner, owned = {}, {}
    for n in on_input_path:
        cut = [m for m, _ in children.get(n, ()) if m not in on_input_path]
        mine, stack, seen = [], cut, set(cut)
        while stack:
            node = stack.pop()
            if isinstance(node, _AccumulateGrad) and id(node.variable) in param_ids:
                if owner.setdefault(node, n) is not n:
                    return None
                mine.append(GradientEdge(node, 0))
            for child, _ in children.get(node, ()):
                if child not in seen and child not in on_input_path:
                    seen.add(child)
                    stack.append(child)
        if mine:
            owned[n] = mine
    return owned


def backward_weight(state: SplitBackward) -> None:
    """W: accumulate the parameter gradients into ``.grad`` (hooks fire). Frees the kept graph."""
    if state.root is not None:
        if state.no_input:  # B had nothing to do: W is the stage's whole backward, as BW runs it
            torch.autograd.backward(state.root, state.root_grad)
        elif state.params:
            torch.autograd.backward(state.root, state.root_grad, inputs=state.params)
        state.root = state.root_grad = None
        return
    for edges, grads, inputs in state.weight_calls:
        # The engine is called directly: torch.autograd.backward's checks of each GradientEdge's shape
        # (symbolic-shape helpers, ~0.1 ms a call) were most of W's overhead at small sizes, and these gradients
        # came out of the engine itself. Arguments: keep_graph, create_graph, inputs, allow_unreachable,
        # accumulate_grad, what torch.autograd.backward(edges, grads, inputs=inputs) passes.
        _engine_run_backward(edges, grads, False, False, inputs, True, True)
    state.weight_calls = []
