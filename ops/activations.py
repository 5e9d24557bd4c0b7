"""log_sigmoid_forward and log_sigmoid_backward: elementwise, with a buffer.

log_sigmoid_forward(x) -> (output, buffer) and log_sigmoid_backward(grad_output, x, buffer) -> grad_input are
pointwise, so they follow ``pointwise.pointwise_rule`` (a Shard of any dim stays; a Partial input is reduced
first, log-sigmoid is not linear). The buffer has x's shape (on CPU and in the meta kernel the dispatcher reads
shapes from) and is sliced like it. The backward is linear in grad_output:

    grad_output        x, buffer      grad_input
    Partial(sum|avg)   Replicate      Partial (same op)
    otherwise                         pointwise_rule
"""

from __future__ import annotations

from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten
from .pointwise import pointwise_rule


@register_rule(aten.log_sigmoid_forward.default, strided="as_shard")  # elementwise
def log_sigmoid_forward_rule(op: OpSchema) -> Sharding:
    return pointwise_rule(op)  # one input, both outputs laid out like it


@register_rule(aten.log_sigmoid_backward.default, strided="as_shard")  # elementwise
def log_sigmoid_backward_rule(op: OpSchema) -> Sharding:
    grad = op.spec("grad_output")
    inner = pointwise_rule(op)
    inputs = {name: list(t) for name, t in zip(op.names, inner.inputs_for(op))}
    out = list(inner.outputs[0])
    for k, p in enumerate(grad.placements):
        # pointwise_rule reduces a Partial grad; it may stay where x and buffer are whole (linear in grad).
        others_whole = all(s.placements[k].is_replicate() for n, s in zip(op.names, op.specs) if n != "grad_output")
        if p.is_partial() and p.reduce_op in ("sum", "avg") and others_whole:
            inputs["grad_output"][k] = out[k] = p
    return Sharding(inputs={name: tuple(t) for name, t in inputs.items()}, outputs=(tuple(out),))
