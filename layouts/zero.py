"""ZeRO as a layout on the data-parallel mesh dim: stage 3 (``fully_shard``, zero_stage3.py) and stages 1/2
(``ZeroRedundancyOptimizer``, zero_optimizer.py); zero_placement.py says which tensor dim dp shards.

These files own where parameters, gradients and optimizer state live along the dp mesh dim. They move data
only through ``redistribute_together``, which packs the moves into flat buffers: ONE all-gather or
reduce-scatter per bucket (per module for stage 3, per ``bucket_cap_mb`` of gradients or per step for
stages 1/2) instead of one per parameter, as DDP's buckets and FSDP2's flat gathers do. Bytes are the ZeRO
paper's (DESIGN.md reference figures) plus the torch.chunk padding of uneven shards (each tensor's piece is
padded to ceil(size / n) rows, as the per-tensor collectives pad it), all counted by ``comm_mode``.

Stage 3, FSDP2-style: parameters are stored as DTensor leaves sharded on dp (``Shard(0)``; on a (dp, tp) mesh
the first tensor dim tp leaves whole; uneven sizes follow torch.chunk). Before each module's forward its
shards are all-gathered in one flat collective (the next module's gather is already in flight: prefetched in
the forward order recorded on the first step) and bound to the module; after the forward the wholes are
dropped. Tensors autograd saves that are views of a whole are saved as a reference to the shard; backward
re-gathers a module's saved parameters in one flat all-gather when it first needs one (prefetching the next
module's in backward order) and frees them after the module's backward, whose gradients are reduce-scattered
in one flat collective onto the sharded leaves: started there and left in flight while the modules before it
run their backward (waited for when the next one starts, or when backward ends). The outermost module's
forward computes on each rank's rows with the wholes as plain tensors, as FSDP2 does (zero_local.py);
``local_compute=False`` dispatches every op as DTensor, ``overlap=False`` waits for every collective where it
is issued. Under ``torch.compile`` the gathers are traced ``redistribute`` calls (zero_compiled.py). ``mp_policy=MixedPrecision(param_dtype=torch.bfloat16,
reduce_dtype=torch.float32)`` gathers and computes in bf16 (half the all-gather bytes) and reduce-scatters in
fp32 onto the fp32 shards::

    mesh = dtp.init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
    for block in model.blocks:
        fully_shard(block, mesh)
    fully_shard(model, mesh)                       # the rest (embeddings, head); links the prefetch order
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = loss_fn(model(distribute_tensor(x, mesh, [Shard(0)])), y)   # batch sharded on dp
    loss.backward(); opt.step()

Stages 1 and 2: parameters stay ``Replicate`` on dp for compute (place them with ``distribute_module``);
``ZeroRedundancyOptimizer`` keeps sharded master copies, so the wrapped optimizer's state is sharded (an
element-wise one steps them as one flat segment per parameter group and dtype: the masters are views of a
flat buffer laid out as the collectives move it, zero_flat.py and zero_flat_state.py).
Stage 2 reduce-scatters gradients in buckets during backward (gradient memory 1/n); stage 1 keeps the
whole Partial gradients until ``step()`` and reduce-scatters them there in one bucket. ``step()`` then
all-gathers the updated shards back into the replicated parameters in one bucket::

    distribute_module(model, mesh)                  # parameters Replicate on dp
    opt = ZeroRedundancyOptimizer(model.parameters(), mesh, torch.optim.AdamW, stage=2, lr=1e-3)

CPU offload (``offload=CPUOffload()`` on either): the shards / masters, their gradients and the optimizer
state live in host memory and the optimizer steps there; shards are copied to the mesh's device before each
all-gather (so a prefetched gather copies the next unit's shards early) and reduced gradients copied back.
Stage 3 adds (offload.py): ``OverlappedStep(model, torch.optim.AdamW, ...)``, ZeRO-Offload's host step
overlapped with the rest of backward and the next forward, one unit at a time, exact (each unit's next gather
waits for its step); ``fully_shard(..., offload_activations=True)``, the tensors autograd saves kept in host
memory from forward to backward. The units count the bytes copied (``unit.offload_bytes``).

Hierarchical sharding (HSDP / MiCS, stage 3, zero_hybrid.py): ``fully_shard(module, mesh,
mesh_dim=("replicate", "shard"))`` shards inside each group along "shard" and replicates the groups along
"replicate": gathers and the reduce-scatter stay inside a group; the reduced shards are all-reduced across
groups (1/p of the gradient bytes), once per step under gradient accumulation with ``set_requires_all_reduce``.

Tied weights (one Parameter in several modules, ``lm_head.weight is wte.weight``) stay one Parameter: one
entry of one unit, gathered once and bound to every module holding it, one reduce-scatter of its summed
gradient. The unit is the innermost ``fully_shard`` call whose module holds every such module (FSDP's lowest
common ancestor; a later call on an enclosing module takes the Parameter over from an inner one); calls on two
holders neither of which encloses the other raise. Stages 1/2 see it once through ``model.parameters()``.

Composes with tensor parallelism: place the parameters on a (dp, tp) mesh as ``[Replicate(), <tp placement>]``
first and pass ``mesh_dim="dp"``; only the dp placement changes. Gradient accumulation (several backwards,
one step) works for every stage. Not done here: prefetching the first unit's forward gather (nothing runs
before it), and freeing a parameter of an outer ``fully_shard`` module that an inner one's ops save (only the
innermost module's saved-tensor hooks are active; such a tensor is kept, correct but not freed). With
``overlap`` on, stage 3's reduced shards reach ``.grad`` outside autograd: ``torch.autograd.grad`` and
``backward(inputs=...)`` do not see them, post-accumulate-grad hooks do not run on them.
"""

from .offload import OverlappedStep
from .zero_hybrid import set_requires_all_reduce
from .zero_optimizer import ZeroRedundancyOptimizer
from .zero_placement import CPUOffload
from .zero_stage3 import fully_shard

__all__ = ["fully_shard", "ZeroRedundancyOptimizer", "CPUOffload", "OverlappedStep", "set_requires_all_reduce"]
