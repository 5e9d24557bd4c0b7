"""Keywords renamed for issue 17 keep working one release: the old name warns DeprecationWarning and means exactly
what the new one does (same placements, same schedule, same values); passing both is refused; and no public layout
API takes a mesh dim under a tensor-dim name (``tp_dim``...) or ``num_microbatches`` any more.

Renames: ``ep_dim``/``tp_dim`` -> ``ep_mesh_dim``/``tp_mesh_dim`` (expert_parallel, dispatch_combine,
shard_hf_experts), ``pp_dim`` -> ``pp_mesh_dim`` (PipelineStage, SharedWeights), ``num_microbatches`` ->
``n_microbatches`` (torch.distributed.pipelining's name: build_schedule, split_microbatches, with_communication,
Schedule).
"""

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import Shard
from dtensor_plus.layouts import annotation, context_parallel, hf_experts, hf_plan, loss, moe, moe_dispatch
from dtensor_plus.layouts import moe_router, plan, prepare_io, tensor
from dtensor_plus.layouts import pipeline as pipeline_package
from dtensor_plus.layouts.moe import MoE, expert_parallel
from dtensor_plus.layouts.moe_dispatch import dispatch_combine
from dtensor_plus.layouts.pipeline import (
    PipelineSchedule,
    PipelineStage,
    Schedule,
    build_schedule,
    split_microbatches,
)
from dtensor_plus.layouts.pipeline import actions, executor, microbatch, schedules, shared, stage
from dtensor_plus.layouts.pipeline.schedules import with_communication
from dtensor_plus.testing import run_on_ranks

OLD_NAMES = {"tp_dim", "ep_dim", "pp_dim", "dp_dim", "cp_dim", "sp_dim", "num_microbatches"}
MODULES = [annotation, context_parallel, hf_experts, hf_plan, loss, moe, moe_dispatch, moe_router, plan, prepare_io,
           tensor, pipeline_package, actions, executor, microbatch, schedules, shared, stage]


def _deprecated(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and the one DeprecationWarning it must give."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(deprecations) == 1, deprecations
    return result, deprecations[0]


def _public_callables():
    for module in MODULES:
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.isclass(obj):
                yield f"{module.__name__}.{name}", obj.__init__
                for attr, member in vars(obj).items():
                    if inspect.isfunction(member) and not attr.startswith("_"):
                        yield f"{module.__name__}.{name}.{attr}", member
            elif callable(obj):
                yield f"{module.__name__}.{name}", obj


def test_no_public_layout_api_takes_an_old_name():
    found = []
    for where, fn in _public_callables():
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            continue
        found += [f"{where}({p})" for p in params if p in OLD_NAMES]
    assert not found, found


@pytest.mark.parametrize("fn, old, new", [
    (expert_parallel, "ep_dim", "ep_mesh_dim"),
    (expert_parallel, "tp_dim", "tp_mesh_dim"),
    (dispatch_combine, "ep_dim", "ep_mesh_dim"),
    (hf_experts.shard_hf_experts, "ep_dim", "ep_mesh_dim"),
    (PipelineStage, "pp_dim", "pp_mesh_dim"),
    (shared.SharedWeights, "pp_dim", "pp_mesh_dim"),
    (build_schedule, "num_microbatches", "n_microbatches"),
    (split_microbatches, "num_microbatches", "n_microbatches"),
    (with_communication, "num_microbatches", "n_microbatches"),
    (Schedule, "num_microbatches", "n_microbatches"),
])
def test_old_and_new_name_together_are_refused(fn, old, new):
    target = fn.__init__ if inspect.isclass(fn) else fn
    assert new in inspect.signature(target).parameters
    with pytest.raises(TypeError, match=f"pass {new}= only"):
        fn(**{old: 1, new: 1})


def test_num_microbatches_keeps_working_and_warns():
    schedule, message = _deprecated(build_schedule, "1f1b", 2, num_microbatches=4)
    assert message == ("build_schedule(num_microbatches=...) is now n_microbatches=...; the old name goes in the next "
                       "release")
    assert schedule == build_schedule("1f1b", 2, n_microbatches=4)
    assert schedule.n_microbatches == 4
    assert _deprecated(lambda: schedule.num_microbatches)[0] == 4

    x = torch.arange(12.0).view(6, 2)
    pieces, _ = _deprecated(split_microbatches, x, num_microbatches=3)
    assert [p.tolist() for p in pieces] == [p.tolist() for p in split_microbatches(x, n_microbatches=3)]
    assert len(pieces) == 3

    fields = dict(name="s", num_ranks=1, stage_to_rank=(0,), actions=((actions.Action(actions.Kind.STEP),),))
    old, _ = _deprecated(Schedule, num_microbatches=2, **fields)
    assert old == Schedule(n_microbatches=2, **fields)
    compute = [[actions.Action(actions.Kind.F, 0, 0), actions.Action(actions.Kind.BW, 0, 0)]]
    old, _ = _deprecated(with_communication, "c", num_microbatches=1, stage_to_rank=(0,), compute=compute)
    assert old == with_communication("c", n_microbatches=1, stage_to_rank=(0,), compute=compute)


def test_dispatch_combine_ep_dim_keeps_working_and_warns():
    torch.manual_seed(0)
    x, idx, gates = torch.randn(5, 3), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    scale = torch.arange(1.0, 5.0)

    def experts(rows, counts):  # expert e multiplies by e + 1
        return rows * scale.repeat_interleave(counts).unsqueeze(-1)

    old, _ = _deprecated(dispatch_combine, x, idx, gates, None, 4, experts, mesh=None, ep_dim=None)
    torch.testing.assert_close(old, dispatch_combine(x, idx, gates, None, 4, experts, mesh=None, ep_mesh_dim=None))


# -- real ranks: the old keywords place and train exactly as the new ones ------------------------------------


def _moe():
    torch.manual_seed(0)
    return MoE(4, 6, 2, 1)


def _expert_parallel_old_names():
    mesh = dtp.init_device_mesh("cpu", (1, 2), mesh_dim_names=("ep", "tp"))
    new, old_ep, old_tp = (_moe() for _ in range(3))
    expert_parallel(new, mesh, ep_mesh_dim="ep", tp_mesh_dim="tp")
    _, message = _deprecated(expert_parallel, old_ep, mesh, ep_dim="ep", tp_mesh_dim="tp")
    assert message == "expert_parallel(ep_dim=...) is now ep_mesh_dim=...; the old name goes in the next release"
    _, message = _deprecated(expert_parallel, old_tp, mesh, ep_mesh_dim="ep", tp_dim="tp")
    assert message == "expert_parallel(tp_dim=...) is now tp_mesh_dim=...; the old name goes in the next release"
    assert new.experts.w1.placements == (Shard(0), Shard(2)) and new.experts.w2.placements == (Shard(0), Shard(1))
    for old in (old_ep, old_tp):
        for got, want in ((old.experts.w1, new.experts.w1), (old.experts.w2, new.experts.w2)):
            assert got.placements == want.placements
            torch.testing.assert_close(got.to_local(), want.to_local(), atol=0, rtol=0)


def test_expert_parallel_old_names_place_as_the_new_ones():
    run_on_ranks(2, _expert_parallel_old_names)


def _pipeline_old_names():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    rank = mesh.get_local_rank("pp")
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    whole = F.mse_loss(layers(x), y)
    whole.backward()
    piece = layers[:2] if rank == 0 else layers[2:]
    expected = [p.grad.clone() for p in piece.parameters()]
    piece.zero_grad(set_to_none=True)
    stage_, message = _deprecated(PipelineStage, piece, rank, 2, mesh, pp_dim="pp")
    assert message == "PipelineStage.__init__(pp_dim=...) is now pp_mesh_dim=...; the old name goes in the next release"
    assert stage_.pp_mesh_dim == "pp"
    schedule, _ = _deprecated(build_schedule, "1f1b", 2, num_microbatches=2)
    losses = []
    PipelineSchedule(stage_, schedule, loss_fn=F.mse_loss).step(x, target=y, losses=losses)
    for got, want in zip([p.grad for p in piece.parameters()], expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    if rank == 1:
        torch.testing.assert_close(sum(losses) / 2, whole.detach(), atol=1e-6, rtol=1e-6)


def test_pipeline_old_names_step_as_one_device():
    """The stage and schedule built with the old keywords give the single-device loss and gradients."""
    run_on_ranks(2, _pipeline_old_names)
