"""What an aten op is, read once from its schema: the facts every later decision about it needs.

The dispatcher used to ask these questions of the schema on every plan (and three modules each found the
in-place op's functional twin their own way); now ``record_of(func)`` answers them at an op's first sight and
keeps the answer on the dispatcher object:

- its argument names, in schema order (rules read their inputs by name: ``OpSchema.spec("weight")``);
- how it writes: in place into its first argument (``add_``), an in-place view (``t_``, ``resize_``), through
  ``out=`` arguments, or not at all; and the functional twin that computes the same values out of place;
- whether it returns a view of its first argument, draws random numbers (and where its ``dropout_p`` sits,
  for attention, which draws nothing at 0), or is a multi-tensor (foreach / fused-optimizer) op.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from .dispatcher import DISPATCHER

__all__ = ["OpRecord", "record_of"]

_aten = torch.ops.aten
# In-place views change self's sizes, which a copy back into self cannot: they run as the view op, then self
# takes the result's block and spec (mutation.py).
_INPLACE_VIEWS = frozenset({_aten.squeeze_, _aten.unsqueeze_, _aten.t_, _aten.transpose_, _aten.resize_, _aten.resize_as_})
# Ops tagged nondeterministic_seeded that draw nothing at dropout_p == 0 (position of dropout_p): attention.
# Strict random mode would otherwise gather their inputs for nothing.
_DROPOUT_P_AT = {
    _aten._scaled_dot_product_flash_attention_for_cpu.default: 3,
    _aten._scaled_dot_product_flash_attention.default: 3,
    _aten._scaled_dot_product_efficient_attention.default: 5,
}
_DROPOUT_P_AT = MappingProxyType(_DROPOUT_P_AT)  # read-only: a constant table


class OpRecord:
    """The facts of one aten overload (see the module docstring)."""

    __slots__ = ("func", "arg_names", "inplace", "inplace_view", "out_names", "functional", "returns_view", "random",
                 "dropout_p_at", "multi_tensor", "returns_tensors")

    def __init__(self, func: torch._ops.OpOverload):
        schema = func._schema
        first = schema.arguments[0].alias_info if schema.arguments else None
        self.func = func
        self.arg_names = tuple(a.name for a in schema.arguments)
        self.inplace = bool(first is not None and first.is_write)  # writes into its first argument
        self.inplace_view = func.overloadpacket in _INPLACE_VIEWS
        self.out_names = tuple(a.name for a in schema.arguments if a.is_out)
        self.functional = _functional_twin(func, self.inplace, self.inplace_view, self.out_names)
        self.returns_view = bool(first is not None and not first.is_write and schema.returns
                                 and schema.returns[0].alias_info is not None)
        self.random = torch.Tag.nondeterministic_seeded in func.tags
        self.dropout_p_at = _DROPOUT_P_AT.get(func)
        name = func.overloadpacket.__name__
        self.multi_tensor = (name.startswith(("_foreach_", "_fused_")) and bool(schema.arguments)
                             and str(schema.arguments[0].type) == "List[Tensor]")
        self.returns_tensors = any(isinstance(r.type, torch.TensorType) for r in schema.returns)

    def draws(self, args, kwargs) -> bool:
        """Does this call draw random numbers? (Per call: the plan key holds a float's type, not its value.)"""
        if not self.random:
            return False
        if self.dropout_p_at is None:
            return True
        at = self.dropout_p_at
        return (args[at] if len(args) > at else kwargs.get("dropout_p", 0.0)) > 0

    def names_of(self, args, kwargs, is_dtensor) -> tuple:
        """The argument name of each DTensor in ``args``/``kwargs``, in order of appearance; an element of a
        list argument is (name, index)."""
        names = []
        for position, value in enumerate(args):
            _collect(self.arg_names[position] if position < len(self.arg_names) else position, value, is_dtensor, names)
        for name, value in kwargs.items():
            _collect(name, value, is_dtensor, names)
        return tuple(names)


def _collect(name, value, is_dtensor, names: list) -> None:
    if is_dtensor(value):
        names.append(name)
    elif type(value) is list or type(value) is tuple:
        names.extend((name, i) for i, v in enumerate(value) if is_dtensor(v))


def _functional_twin(func, inplace: bool, inplace_view: bool, out_names: tuple):
    """What computes the op's values out of place: ``add_.Tensor`` -> ``add.Tensor``; ``mul.out`` and the in-place
    views (``transpose_.default`` -> ``transpose.int``) -> the packet, which picks the overload from the arguments;
    None where aten has no overload of the same name (``normal_.default``: ``normal``'s overloads mean other
    things, so the packet would be wrong there)."""
    if out_names:
        return func.overloadpacket
    if not inplace:
        return None
    packet = getattr(_aten, func.overloadpacket.__name__.rstrip("_"), None)
    if inplace_view:
        return packet
    return getattr(packet, func._overloadname, None) if packet is not None else None


def record_of(func) -> OpRecord:
    record = DISPATCHER.records.get(func)
    if record is None:
        record = DISPATCHER.records[func] = OpRecord(func)
    return record
