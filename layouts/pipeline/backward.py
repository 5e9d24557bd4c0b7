"""The zero-bubble split of one stage's backward: B (gradient of the stage input) now, W (weight gradients) later.

Every path in a stage's autograd graph from its output to a parameter leaves the set I of nodes that can reach
the stage input exactly once: along a *cut edge* n -> m with n in I and m outside it (once a node cannot reach
the input, none below it can). So

- B runs autograd from the output to the input only. Autograd then skips every output of a node that no path
  to the input needs (a Linear's weight-gradient matmul), and a pre-hook on each cut parent n keeps the
  gradient arriving at n;
- W re-enters the kept graph at each cut parent with its kept gradient and backpropagates it to the parameters
  its cut edges reach (``torch.autograd.backward(..., inputs=those parameters)``): the weight-gradient matmuls
  skipped in B, and the gradients accumulate into ``.grad`` with post-accumulate hooks (data parallel
  reduction, ZeRO) firing as in an ordinary backward. One call per cut parent: asked together, a parent
  reachable from another through the input path would be entered twice.

A parameter reached from two cut parents (used twice, e.g. once beside the input path) would make one parent's
W run through the other's input path and count twice. Such graphs take the plain fallback: W runs the whole
backward again restricted to the parameters (``inputs=``): exact, but it costs a second backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = ["SplitBackward", "backward_input", "backward_weight"]


@dataclass
class SplitBackward:
    """What B leaves for W: the kept gradients at the cut parents, or the root for the fallback."""

    root: torch.Tensor | None = None  # fallback: the whole backward again (None once W ran)
    root_grad: torch.Tensor | None = None
    params: list = field(default_factory=list)
    cut_parents: list = field(default_factory=list)  # [(node, {slot: kept grad}, [the parameters it reaches])]


def _walk(root_node) -> set:
    """Every node reachable from ``root_node`` (iterative: graphs are deep)."""
    seen, stack = {root_node}, [root_node]
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def _reaching(nodes, target) -> set:
    """The nodes of ``nodes`` from which ``target`` can be reached (target included)."""
    reach, stack, done = {target}, [], set()
    for start in nodes:  # iterative post-order: children decided before parents
        if start in done:
            continue
        stack.append((start, iter(start.next_functions)))
        done.add(start)
        while stack:
            node, children = stack[-1]
            child = next((c for c, _ in children if c is not None and c not in done), None)
            if child is not None:
                done.add(child)
                stack.append((child, iter(child.next_functions)))
                continue
            stack.pop()
            if any(c in reach for c, _ in node.next_functions if c is not None):
                reach.add(node)
    return reach


def backward_input(root: torch.Tensor, root_grad, input_leaf, params) -> tuple[torch.Tensor | None, SplitBackward]:
    """B: the gradient of ``input_leaf`` (None when the stage has no differentiable input), and the state W needs.

    ``root`` is the stage output (``root_grad`` its gradient) or the scaled loss (``root_grad`` None)."""
    params = [p for p in params if p.requires_grad]
    if root is input_leaf:  # a stage that passes its input through unchanged
        return root_grad, SplitBackward()
    if root.grad_fn is None:
        return None, SplitBackward()
    if input_leaf is None or not input_leaf.requires_grad:
        return None, SplitBackward(root=root, root_grad=root_grad, params=params)
    leaf_node = get_gradient_edge(input_leaf).node
    nodes = _walk(root.grad_fn)
    if leaf_node not in nodes:  # the output does not depend on the input
        return torch.zeros_like(input_leaf), SplitBackward(root=root, root_grad=root_grad, params=params)
    on_input_path = _reaching(nodes, leaf_node)
    cut = [(n, m, nr) for n in on_input_path for m, nr in n.next_functions if m is not None and m not in on_input_path]
    owned = _owned_params(cut, on_input_path, params)
    if owned is None:  # a parameter reached from two cut parents: the exact split would count it twice
        (grad,) = torch.autograd.grad(root, [input_leaf], root_grad, retain_graph=True)
        return grad, SplitBackward(root=root, root_grad=root_grad, params=params)
    nodes, kept, handles = list(owned), {}, []
    for i, n in enumerate(nodes):
        # Keyed by index: the hook holds no reference to its node (no node -> hook -> node cycle).
        def keep(grad_outputs, i=i):
            kept[i] = {k: g for k, g in enumerate(grad_outputs) if g is not None}
        handles.append(n.register_prehook(keep))
    try:
        (grad,) = torch.autograd.grad(root, [input_leaf], root_grad, retain_graph=True)
    finally:
        for handle in handles:
            handle.remove()
    parents = [(nodes[i], by_slot, owned[nodes[i]]) for i, by_slot in kept.items() if by_slot and owned[nodes[i]]]
    return grad, SplitBackward(params=params, cut_parents=parents)


def _owned_params(cut, on_input_path, params) -> dict | None:
    """For each cut parent, the parameters reachable from it through its cut edges; None when some parameter is
    reachable from two cut parents (the W of one would then run through the other's input path)."""
    param_of = {get_gradient_edge(p).node: p for p in params}
    owner, owned = {}, {}
    for n, m, _ in cut:
        mine = owned.setdefault(n, [])
        stack, seen = [m], {m}
        while stack:
            node = stack.pop()
            if node in param_of:
                if owner.setdefault(node, n) is not n:
                    return None
                if not any(q is param_of[node] for q in mine):
                    mine.append(param_of[node])
            for child, _ in node.next_functions:
                if child is not None and child not in seen and child not in on_input_path:
                    seen.add(child)
                    stack.append(child)
    return owned


def backward_weight(state: SplitBackward) -> None:
    """W: accumulate the parameter gradients into ``.grad`` (hooks fire). Frees the kept graph."""
    if state.root is not None:
        if state.params:
            torch.autograd.backward(state.root, state.root_grad, inputs=state.params)
        state.root = state.root_grad = None
        return
    for node, by_slot, owned in state.cut_parents:
        # One call per cut parent, restricted to the parameters only its cut edges reach: asked together, a
        # parent reachable from another through the input path would be entered twice.
        slots = list(by_slot)
        torch.autograd.backward([GradientEdge(node, k) for k in slots], [by_slot[k] for k in slots], inputs=owned)
    state.cut_parents = []
