"""A simulated world: any dtensor_plus program run as one rank of a world of any size, in this process.

    from dtensor_plus.simulate import simulated_world, simulate_step

    with simulated_world(1024, rank=5) as world:
        ...                                           # build meshes, the model, its layout, as on the cluster
        result = simulate_step(world, step, models=[model], optimizers=[opt])
    result.collectives        # every collective: kind, mesh dim, bytes, aten op, module, forward/backward
    result.memory             # parameters / gradients / optimizer / activations, bytes
    result.flops_by_op        # this rank's local FLOPs by aten op

Exact where it can be, stated where it cannot (tests/simulate/test_exact.py compares every layout with real gloo
ranks: collectives in order with their bytes, memory, FLOPs): where a real rank reads values other ranks hold,
the simulated world assumes them, and says so. Expert parallelism: the routing (``expert_load``, balanced by
default: the all-to-all splits); pipelines: the ranks that differ are simulated one after another in pp order,
sharing a ``Wire`` (a stage's input spec comes from its sender's header), with the weights tied across stages
given (``pipeline_ties``). A value read nothing assumes raises ``SimulationValueError``.

    wire = Wire()
    for rank in (0, 1, 2):                             # pp 3: first, middle, last stage, in pp order
        with simulated_world(3, rank, wire=wire) as world:
            ...

world.py: the fake process group, the meta device, the assumptions (``SimulatedWorld``, ``Wire``,
``current_world``); meta_ops.py: the dispatch mode keeping local tensors meta and counting FLOPs; memory.py:
state and saved-tensor memory; step.py: the record of one step.
"""

from .meta_ops import SimulationValueError
from .step import Collective, SimulatedStep, measure_step, simulate_step
from .world import SimulatedWorld, Wire, current_world, simulated_world

__all__ = ["simulated_world", "SimulatedWorld", "simulate_step", "measure_step", "SimulatedStep", "Collective",
           "SimulationValueError", "Wire", "current_world"]
