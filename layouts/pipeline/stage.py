"""One pipeline stage: a piece of the model held by one rank of the ``pp`` mesh dim, its per-microbatch
autograd state, and what crosses its boundaries.

Inside a stage the model keeps its own layouts (dp / ZeRO, tp, sp, cp) on the other mesh dims, so an activation
leaving a stage is a DTensor on a sub-mesh without ``pp``. Only its local shard travels (to the rank with the
same coordinates on the other mesh dims, one step along ``pp``), with the spec: global shape, stride, dtype, the
sub-mesh's dim names and the placements. The spec crosses once per stage boundary, in a small header before the
first microbatch's data (JSON, never a pickle: ``header.py``); after that both sides know it and only the data
moves (cached across steps). The gradient travelling back needs no header: it is laid out as the activation's
gradient placements (Partial -> Replicate), so its local shape is the activation's.

Example (pp=2, tp=2 inside each stage)::

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    piece = blocks_of_this_rank(...)                       # an nn.Module, laid out on mesh["tp"]
    stage = PipelineStage(piece, stage_index=mesh.get_local_rank("pp"), num_stages=2, mesh=mesh)
"""

from __future__ import annotations

import torch
from torch import nn

from dtensor_plus.dtensor import DTensor
from dtensor_plus.placement_tuples import without_partial
from dtensor_plus.renamed import renamed_keywords
from dtensor_plus.simulate import SimulationValueError, current_world
from dtensor_plus.spec import DTensorSpec

from .backward import SplitBackward, backward_input, backward_weight
from .header import HEADER_BYTES, ActivationMeta
from .sequence_chunks import KeyValueCache, SequenceSplit

__all__ = ["PipelineStage", "message_tag", "ActivationMeta", "HEADER_BYTES"]

_F_DATA, _B_DATA, _F_HEADER = range(3)


def message_tag(boundary: int, microbatch: int, code: int, num_stages: int) -> int:
    """A distinct p2p tag per message of a step, so messages between one pair of ranks never match out of order
    (interleaved and V schedules carry forward and backward traffic of several stages between the same pair)."""
    return (microbatch * (num_stages + 1) + boundary) * 3 + code


class PipelineStage:
    """A piece of the model (``submodule``) as stage ``stage_index`` of ``num_stages``, on the ``pp_mesh_dim`` of
    ``mesh``.

    Args:
        submodule: the stage's layers; its parameters live only on the ranks of this stage (already laid out
            on the other mesh dims, if any). The first stage takes the model input, the last returns what the
            loss function takes.
        stage_index, num_stages: the global stage number (model order) and the stage count; a rank may hold
            several stages (interleaved and V schedules): build one PipelineStage per stage.
        mesh: the whole mesh, with a ``pp_mesh_dim`` mesh dim (a 1-D ("pp",) mesh when there is nothing else).
        pp_mesh_dim: the name of the pipeline mesh dim.
        shared_parameters: ``{parameter name in submodule: key}`` for weights other stages hold too (a tied
            embedding and head): the schedule sums their gradients over the stages declaring the same key
            (``shared.py``; ``find_shared_parameters`` computes these from the model's pieces).
        num_pipelines: the schedule's independent pipelines (2 for Chimera): stage numbers are pipeline-major, so
            the first and last stage of each pipeline take the model input and compute the loss.

    The executor (``PipelineSchedule``) drives it: ``forward_one``, ``backward_one`` (B and W together),
    ``backward_input`` (B) and ``backward_weight`` (W), and the message methods for the p2p ops it posts.
    """

    @renamed_keywords(pp_dim="pp_mesh_dim")
    def __init__(self, submodule: nn.Module, stage_index: int, num_stages: int, mesh, *, pp_mesh_dim: str = "pp",
                 shared_parameters: dict[str, str] | None = None, num_pipelines: int = 1):
        if not isinstance(submodule, nn.Module):
            raise TypeError(f"submodule must be an nn.Module, got {type(submodule).__name__}")
        if not (isinstance(num_stages, int) and num_stages >= 1 and isinstance(stage_index, int)
                and 0 <= stage_index < num_stages):
            raise ValueError(f"stage_index({stage_index}) must be in [0, num_stages({num_stages}))")
        if not mesh.mesh_dim_names or pp_mesh_dim not in mesh.mesh_dim_names:
            raise ValueError(f"mesh has dims {mesh.mesh_dim_names}; name the pipeline dim pp_mesh_dim={pp_mesh_dim!r}")
        self.shared_parameters = _checked_shared(submodule, shared_parameters or {}, stage_index)
        self.submodule, self.stage_index, self.num_stages = submodule, stage_index, num_stages
        self.mesh, self.pp_mesh_dim = mesh, pp_mesh_dim
        if not (isinstance(num_pipelines, int) and num_pipelines >= 1 and num_stages % num_pipelines == 0):
            raise ValueError(f"num_stages({num_stages}) must split into num_pipelines({num_pipelines}) equal pipelines")
        per_pipeline, self.num_pipelines = num_stages // num_pipelines, num_pipelines
        self.is_first, self.is_last = stage_index % per_pipeline == 0, stage_index % per_pipeline == per_pipeline - 1
        self.params = [p for p in submodule.parameters() if p.requires_grad]
        self.input_meta: ActivationMeta | None = None  # cached after the first receive
        self.output_meta: ActivationMeta | None = None  # cached after the first send
        self._submeshes: dict[tuple[str, ...], object] = {}
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # mb -> (input, leaf)
        self._roots: dict[int, torch.Tensor] = {}  # mb -> output (or the scaled loss on the last stage)
        self._outputs: dict[int, torch.Tensor] = {}  # mb -> output, until sent
        self._grad_outputs: dict[int, torch.Tensor] = {}  # mb -> local gradient of the output
        self._grad_inputs: dict[int, torch.Tensor] = {}  # mb -> local gradient of the input, to send
        self._pending_w: dict[int, SplitBackward] = {}
        self._split_plans: dict = {}  # backward_input's walk of this stage's graph, recorded once
        self._recv_buffers: dict[int, torch.Tensor] = {}
        self._sequence: SequenceSplit | None = None  # this step's cut when the units are sequence chunks
        self._kv_caches: dict[int, KeyValueCache] = {}  # sample -> its chunks' keys and values, until chunk 0's BW

    def __repr__(self) -> str:
        return f"PipelineStage({self.stage_index}/{self.num_stages}, {type(self.submodule).__name__})"

    def reset_shapes(self) -> None:
        """Forget the cached activation specs (call on every rank when microbatch shapes change)."""
        self.input_meta = self.output_meta = None

    def begin_sequence_step(self, split: SequenceSplit | None) -> None:
        """The units of the coming step are the sequence chunks of ``split`` (None: whole microbatches)."""
        if self._kv_caches:
            raise RuntimeError(f"stage {self.stage_index}: keys and values of samples {sorted(self._kv_caches)} left "
                               "from the last step (its chunk 0 backward did not run: build the stage anew after a failed "
                               "step)")
        self._sequence = split

    def _meta_of(self, microbatch: int, meta: ActivationMeta) -> ActivationMeta:
        """``meta`` (the spec the header carried) for ``microbatch``: with sequence chunks, dim 1 is its length."""
        if self._sequence is None:
            return meta
        if len(meta.local_shape) < 2:
            raise ValueError(f"stage {self.stage_index}: an activation of shape {meta.local_shape} has no sequence dim "
                             "(dim 1) to cut into chunks")
        length = self._sequence.length(microbatch)
        local = meta.local_shape[:1] + (length,) + meta.local_shape[2:]
        if meta.global_shape is None:
            return ActivationMeta(local, meta.dtype)
        ndim = len(meta.global_shape)
        if any(p.is_shard() and p.dim % ndim == 1 for p in meta.placements):
            raise ValueError(f"stage {self.stage_index}: an activation placed {list(meta.placements)} is sharded along "
                             "the sequence (dim 1), which the sequence schedules cut whole on every rank")
        if meta.stride != _contiguous_stride(meta.global_shape):
            raise ValueError(f"stage {self.stage_index}: a sequence chunk's activation of stride {meta.stride} is not "
                             "contiguous; return a contiguous tensor from the stage")
        shape = meta.global_shape[:1] + (length,) + meta.global_shape[2:]
        return ActivationMeta(local, meta.dtype, shape, _contiguous_stride(shape), meta.mesh_dim_names, meta.placements)

    # -- compute ------------------------------------------------------------------------------------------

    def set_input(self, microbatch: int, x: torch.Tensor) -> None:
        """The first stage's input for ``microbatch`` (model input: no gradient flows back from it)."""
        self._inputs[microbatch] = (x, None)

    def set_input_local(self, microbatch: int, local: torch.Tensor, meta: ActivationMeta) -> None:
        """The input for ``microbatch`` from the previous stage's local shard: a fresh leaf, so this stage's graph
        ends here and B / BW read the input gradient off it."""
        leaf = local.detach()
        if leaf.is_floating_point():
            leaf.requires_grad_(True)
        x = leaf
        if meta.global_shape is not None:
            x = DTensor.from_local(leaf, self._submesh(meta.mesh_dim_names), meta.placements,
                                   shape=meta.global_shape, stride=meta.stride)
        self._inputs[microbatch] = (x, leaf if leaf.requires_grad else None)

    def forward_one(self, microbatch: int, loss_fn=None, target=None, loss_scale: float = 1.0):
        """F: run the stage on ``microbatch``'s input; on the last stage also the loss (``loss_fn(output, target)``,
        backpropagated times ``loss_scale``). Returns (output, unscaled loss or None), both detached."""
        if microbatch not in self._inputs:
            raise RuntimeError(f"stage {self.stage_index}: F for microbatch {microbatch} before its input arrived")
        x, _ = self._inputs[microbatch]
        if self._sequence is None:
            out = self.submodule(x)
        else:
            sample = self._sequence.sample_and_chunk(microbatch)[0]
            cache = self._kv_caches.setdefault(sample, KeyValueCache(self.stage_index, sample))
            out = self.submodule(x, sequence_chunk=self._sequence.chunk(microbatch, cache))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"stage {self.stage_index} returned {type(out).__name__}; a stage must return one tensor")
        if self.is_last and loss_fn is not None:
            loss = loss_fn(out, target)
            self._roots[microbatch] = loss * loss_scale if loss_scale != 1.0 else loss
            return out.detach(), loss.detach()
        self._roots[microbatch] = out
        if not self.is_last:
            self._outputs[microbatch] = out  # until it is sent
        return out.detach(), None

    def _root_and_grad(self, microbatch: int):
        root = self._roots.pop(microbatch)
        if self.is_last and root.ndim == 0 and microbatch not in self._grad_outputs:
            return root, None
        if microbatch not in self._grad_outputs:
            raise RuntimeError(f"stage {self.stage_index}: backward of microbatch {microbatch} before its gradient arrived")
        local = self._grad_outputs.pop(microbatch)
        if isinstance(root, DTensor):
            spec = root._spec
            return root, DTensor(local, DTensorSpec(spec.mesh, without_partial(spec.placements), spec.tensor_meta))
        return root, local

    def backward_one(self, microbatch: int) -> None:
        """BW: input and weight gradients together (GPipe, 1F1B)."""
        root, grad = self._root_and_grad(microbatch)
        _, leaf = self._inputs.pop(microbatch)
        self._outputs.pop(microbatch, None)
        torch.autograd.backward(root, grad)
        if leaf is not None:
            self._grad_inputs[microbatch] = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        if self._sequence is not None:
            sample, chunk = self._sequence.sample_and_chunk(microbatch)
            if chunk == 0:  # the sample's last backward here: no chunk reads its keys and values any more
                self._kv_caches.pop(sample, None)
            else:
                self._kv_caches[sample].release(chunk)

    def backward_input(self, microbatch: int) -> None:
        """B: the input gradient only; the weight gradients wait for ``backward_weight`` (zero bubble)."""
        root, grad = self._root_and_grad(microbatch)
        _, leaf = self._inputs.pop(microbatch)
        self._outputs.pop(microbatch, None)
        grad_input, self._pending_w[microbatch] = backward_input(root, grad, leaf, self.params, self._split_plans)
        if leaf is not None:
            self._grad_inputs[microbatch] = grad_input if grad_input is not None else torch.zeros_like(leaf)

    def backward_weight(self, microbatch: int) -> None:
        """W: accumulate the weight gradients of ``microbatch`` (after its B)."""
        if microbatch not in self._pending_w:
            raise RuntimeError(f"stage {self.stage_index}: W for microbatch {microbatch} before its B")
        backward_weight(self._pending_w.pop(microbatch))

    def check_idle(self) -> None:
        """At the end of a step nothing may be left in flight."""
        left = {name: sorted(d) for name, d in (("inputs", self._inputs), ("outputs", self._roots), ("B", self._grad_outputs),
                                                ("W", self._pending_w), ("sends", self._grad_inputs),
                                                ("keys and values of samples", self._kv_caches)) if d}
        if left:
            raise RuntimeError(f"stage {self.stage_index}: microbatches left at the end of the step: {left}")

    # -- messages -----------------------------------------------------------------------------------------

    def output_local(self, microbatch: int) -> tuple[torch.Tensor, ActivationMeta]:
        """The local shard of ``microbatch``'s output (no longer kept here) and its spec (the same every microbatch)."""
        out = self._outputs.pop(microbatch)
        local = out._local_tensor if isinstance(out, DTensor) else out
        meta = ActivationMeta.of(out)
        if self.output_meta is not None and meta != self._meta_of(microbatch, self.output_meta):
            raise ValueError(f"stage {self.stage_index}: output spec changed from {self.output_meta} to {meta}; specs "
                             "are exchanged once: call reset_shapes() on every stage of every rank")
        return local.detach().contiguous(), meta

    def forward_sends(self, microbatch: int, peer: int) -> list:
        """p2p ops sending ``microbatch``'s output to the next stage's rank (header first, the first time)."""
        local, meta = self.output_local(microbatch)
        boundary = self.stage_index + 1
        sends = []
        if self.output_meta is None:
            self.output_meta = meta
            tag = message_tag(boundary, 0, _F_HEADER, self.num_stages)
            sends.append((meta.encode(), peer, tag))
            simulated = current_world()
            if simulated is not None and simulated.wire is not None:  # for the receiver's simulation, if any
                simulated.wire.post(self._global_rank(peer), tag, meta)
        sends.append((local, peer, message_tag(boundary, microbatch, _F_DATA, self.num_stages)))
        return sends

    def header_recv(self, peer: int):
        """The p2p op receiving the input spec, when not known yet (else None). One header per boundary, whichever
        microbatch carries it: its tag names no microbatch."""
        if self.input_meta is not None:
            return None
        return torch.empty(HEADER_BYTES, dtype=torch.uint8), peer, message_tag(self.stage_index, 0, _F_HEADER, self.num_stages)

    def read_header(self, header: torch.Tensor, peer: int) -> None:
        """The input spec from the received ``header``. A simulated world moves no data: there the spec is the one
        the sending rank's simulation posted on the world's ``Wire`` (``dtensor_plus.simulate``)."""
        simulated = current_world()
        if simulated is None:
            self.input_meta = ActivationMeta.decode(header)
            return
        if simulated.wire is None:
            raise SimulationValueError(
                f"pipeline stage {self.stage_index} receives its input's spec from the previous stage's rank, which a "
                f"simulated world does not run: simulate the pp ranks in order, each in a simulated_world(..., "
                f"wire=w) sharing one dtensor_plus.simulate.Wire w")
        me = self._global_rank(self.mesh.get_local_rank(self.pp_mesh_dim))
        tag = message_tag(self.stage_index, 0, _F_HEADER, self.num_stages)
        self.input_meta = simulated.wire.read(me, tag, self._global_rank(peer))

    def _global_rank(self, pp_index: int) -> int:
        return self.mesh.row_ranks(self.pp_mesh_dim)[pp_index]

    def forward_recv(self, microbatch: int, peer: int):
        """The p2p op receiving ``microbatch``'s input shard (the spec must be known)."""
        buf = torch.empty(self._meta_of(microbatch, self.input_meta).local_shape, dtype=self.input_meta.dtype)
        self._recv_buffers[microbatch] = buf
        return buf, peer, message_tag(self.stage_index, microbatch, _F_DATA, self.num_stages)

    def finish_forward_recv(self, microbatch: int) -> None:
        self.set_input_local(microbatch, self._recv_buffers.pop(microbatch), self._meta_of(microbatch, self.input_meta))

    def backward_sends(self, microbatch: int, peer: int) -> list:
        grad = self._grad_inputs.pop(microbatch).contiguous()
        return [(grad, peer, message_tag(self.stage_index, microbatch, _B_DATA, self.num_stages))]

    def backward_recv(self, microbatch: int, peer: int):
        """The p2p op receiving the gradient of ``microbatch``'s output (shaped as the output's local shard)."""
        if self.output_meta is None:
            raise RuntimeError(f"stage {self.stage_index}: RECV_B before any SEND_F (the output spec is unknown)")
        buf = torch.empty(self._meta_of(microbatch, self.output_meta).local_shape, dtype=self.output_meta.dtype)
        self._grad_outputs[microbatch] = buf
        return buf, peer, message_tag(self.stage_index + 1, microbatch, _B_DATA, self.num_stages)

    def pass_forward_to(self, nxt: PipelineStage, microbatch: int) -> None:
        """Hand the output to the next stage on this same rank (V schedules): as a send and receive would."""
        local, meta = self.output_local(microbatch)
        self.output_meta = nxt.input_meta = meta
        nxt.set_input_local(microbatch, local, meta)

    def pass_backward_to(self, prev: PipelineStage, microbatch: int) -> None:
        prev._grad_outputs[microbatch] = self._grad_inputs.pop(microbatch)

    def _submesh(self, names):
        if self.pp_mesh_dim in names:
            raise ValueError(f"an activation placed on the pipeline mesh dim {self.pp_mesh_dim!r} cannot cross a stage: "
                             f"{names}")
        if names not in self._submeshes:
            self._submeshes[names] = self.mesh[names]
        return self._submeshes[names]


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def _checked_shared(submodule: nn.Module, shared: dict, stage_index: int) -> dict[str, str]:
    if not isinstance(shared, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
        raise TypeError(f"stage {stage_index}: shared_parameters must map parameter names to keys (str -> str), got "
                        f"{shared!r}")
    names = dict(submodule.named_parameters(remove_duplicate=False))
    unknown = sorted(set(shared) - set(names))
    if unknown:
        raise ValueError(f"stage {stage_index}: shared_parameters names {unknown}, which the stage's module does not "
                         f"have; its parameters are {sorted(names)}")
    return dict(shared)
