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
    cut_parents: list = field(default_factory=list)  # [(node, {slot: kept grad}, [the parameters it reaches])]


def _children(root_node) -> dict:
    """Every node reachable from ``root_node``, each with its (child, input_nr) edges: ``next_functions`` is read
    once per node (each read builds new Python tuples), iteratively (graphs are deep)."""
    children, stack = {}, [root_node]
    while stack:
        node = stack.pop()
        if node in children:
            continue
        kids = [(c, nr) for c, nr in node.next_functions if c is not None]
        children[node] = kids
        stack.extend(c for c, _ in kids if c not in children)
    return children


def _reaching(children: dict, root_node, target) -> set:
    """The nodes below ``root_node`` from which ``target`` can be reached (target included): an iterative post-order
    walk, children decided before their parents."""
    reach, done, stack = {target}, {root_node}, [(root_node, iter(children[root_node]))]
    while stack:
        node, kids = stack[-1]
        for child, _ in kids:
            if child not in done:
                done.add(child)
                stack.append((child, iter(children[child])))
                break
        else:
            stack.pop()
            if any(c in reach for c, _ in children[node]):
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
        return None, SplitBackward(root=root, root_grad=root_grad, params=params, no_input=True)
    leaf_node = get_gradient_edge(input_leaf).node
    children = _children(root.grad_fn)
    if leaf_node not in children:  # the output does not depend on the input
        return torch.zeros_like(input_leaf), SplitBackward(root=root, root_grad=root_grad, params=params)
    on_input_path = _reaching(children, root.grad_fn, leaf_node)
    owned = _owned_params(children, on_input_path, params)
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
    parents = [(nodes[i], by_slot, owned[nodes[i]]) for i, by_slot in kept.items() if by_slot]
    return grad, SplitBackward(params=params, cut_parents=parents)


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
    for node, by_slot, owned in state.cut_parents:
        # One call per cut parent, restricted to the parameters only its cut edges reach: asked together, a
        # parent reachable from another through the input path would be entered twice. The engine is called
        # directly: torch.autograd.backward's checks of each GradientEdge's shape (symbolic-shape helpers, ~0.1 ms
        # a call) were most of W's overhead at small sizes, and these gradients came out of the engine itself.
        slots = list(by_slot)
        _engine_run_backward(tuple(GradientEdge(node, k) for k in slots), tuple(by_slot[k] for k in slots),
                             False, False, tuple(owned), True, True)  # keep_graph, create_graph, inputs,
        # allow_unreachable, accumulate_grad: what torch.autograd.backward(..., inputs=owned) passes
    state.cut_parents = []
