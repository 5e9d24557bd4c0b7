"""ZeRO stages 1, 2 and 3 on a 1-D dp mesh: AdamW steps equal one device (losses and final parameters), the
collectives per step are the ZeRO paper's (counts and bytes), and optimizer state is sharded on dp.

Legend: B batch, D model width, F MLP width, O output width.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, Shard
from dtensor_plus.layouts.zero import CPUOffload, ZeroRedundancyOptimizer, fully_shard
from dtensor_plus.testing import run_on_ranks

B, STEPS = 8, 3


class Block(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x_BD):
        return x_BD + self.fc2(F.gelu(self.fc1(x_BD)))


class MLP(nn.Module):
    def __init__(self, d, f, o):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d, f), Block(d, f)])
        self.head = nn.Linear(d, o)

    def forward(self, x_BD):
        for block in self.blocks:
            x_BD = block(x_BD)
        return self.head(x_BD)


def _model(sizes):
    torch.manual_seed(0)
    return MLP(*sizes).double()


def _data(sizes, step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(B, sizes[0], generator=g, dtype=torch.float64), torch.randn(B, sizes[2], generator=g, dtype=torch.float64)


def _single_device(sizes):
    model = _model(sizes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(STEPS):
        x, y = _data(sizes, step)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach() for k, v in model.named_parameters()}


def _steps(model, opt, mesh, sizes):
    """STEPS steps on batches sharded on the first (dp) mesh dim; the losses and the last step's CommCounter."""
    batch = [Shard(0)] + [Replicate()] * (mesh.ndim - 1)
    losses = []
    for step in range(STEPS):
        x, y = (dtp.distribute_tensor(t, mesh, batch, src_data_rank=None) for t in _data(sizes, step))
        with dtp.comm_mode() as comm:
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(loss.full_tensor().item())
    return losses, comm


def _train(sizes, stage, offload=None):
    """Train on the dp mesh; return losses, whole final parameters, the CommCounter of the last step, the model
    and the optimizer."""
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    model = _model(sizes)
    if stage == 3:
        for block in model.blocks:
            fully_shard(block, mesh, offload=offload)
        fully_shard(model, mesh, offload=offload)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        dtp.distribute_module(model, mesh)
        opt = ZeroRedundancyOptimizer(model.parameters(), mesh, torch.optim.AdamW, stage=stage, offload=offload,
                                      lr=1e-2, weight_decay=0.1)
    losses, comm = _steps(model, opt, mesh, sizes)
    params = {k: v.full_tensor() for k, v in model.named_parameters()}
    return losses, params, comm, model, opt


def _check_equal(sizes, stage, offload=None):
    losses, params, comm, _, opt = _train(sizes, stage, offload)
    want_losses, want_params = _single_device(sizes)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), atol=1e-5, rtol=1e-5)
    for name, want in want_params.items():
        torch.testing.assert_close(params[name], want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert not comm.fallbacks, comm.fallbacks
    if offload is not None:  # on this CPU machine the copies are no-ops: the path runs, the state is in host memory
        for state in opt.state.values():
            assert all(t._local_tensor.device.type == "cpu" for t in state.values() if isinstance(t, DTensor))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_cpu_offload_matches_single_device(stage):
    run_on_ranks(2, _check_equal, (6, 10, 3), stage, CPUOffload(pin_memory=False))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_adamw_matches_single_device(world, stage):
    # (6, 10, 3) on 4 ranks: uneven shards, and the head's bias rows 1, 1, 1, 0 (an empty shard).
    run_on_ranks(world, _check_equal, (6, 10, 3), stage)


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _check_traffic(stage):
    """Even sizes, so each collective's bytes are exactly (n-1)/n of the tensor's (no padding)."""
    _, _, comm, model, opt = _train((8, 16, 4), stage)
    n = torch.distributed.get_world_size()
    psi = _param_bytes(model)
    assert comm.bytes("reduce_scatter", "dp") == (n - 1) * psi // n
    assert comm.count("all_reduce") == 0 and comm.count("all_to_all") == 0 and not comm.fallbacks, comm
    if stage in (1, 2):
        # ZeRO P_os / P_os+g: reduce-scatter of gradients + all-gather of updated parameters = DDP's 2Ψ, each
        # ONE collective (one bucket: the model is far below bucket_cap_mb).
        assert comm.count("reduce_scatter", "dp") == 1 and comm.count("all_gather", "dp") == 1, comm
        assert comm.bytes("all_gather", "dp") == (n - 1) * psi // n
    else:
        # ZeRO P_os+g+p: all-gather in forward (every parameter) and again in backward for each weight an op
        # saved (the first fc1's weight is not: its input needs no gradient), + reduce-scatter: ~3Ψ. One
        # collective per unit (blocks[0], blocks[1], the root) for each of the three.
        regathered = [m.weight for m in (model.blocks[0].fc2, model.blocks[1].fc1, model.blocks[1].fc2, model.head)]
        assert comm.count("all_gather", "dp") == 3 + 3 and comm.count("reduce_scatter", "dp") == 3, comm
        backward_bytes = sum(p.numel() * p.element_size() for p in regathered)
        assert comm.bytes("all_gather", "dp") == (n - 1) * (psi + backward_bytes) // n
    masters = opt.masters if stage != 3 else list(model.parameters())
    for p, master in zip(model.parameters(), masters):
        state = opt.state[master]
        for key in ("exp_avg", "exp_avg_sq"):
            s = state[key]
            assert isinstance(s, DTensor) and s.placements == (Shard(0),), (key, s)
            assert s._local_tensor.numel() == p.numel() // n  # even sizes: exactly 1/n of the parameter


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_traffic_and_sharded_state(stage):
    run_on_ranks(2, _check_traffic, stage)


def _check_freed(local_compute):
    """Stage 3 frees the gathered parameters after forward and the re-gathered ones after backward."""
    import gc
    import weakref

    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    model = _model((8, 16, 4))
    for block in model.blocks:
        fully_shard(block, mesh, local_compute=local_compute)
    fully_shard(model, mesh, local_compute=local_compute)
    gathered = []

    def record(module, args):  # runs after fully_shard's gather hook
        for owner, name, shard in module._zero_state.entries:
            full = owner.__dict__[name]
            if local_compute:  # the plain whole
                assert type(full) is torch.Tensor and full.shape == shard.shape
            else:
                assert isinstance(full, DTensor) and full.placements == (Replicate(),) and full.shape == shard.shape
            gathered.append(weakref.ref(full._local_tensor if isinstance(full, DTensor) else full))

    for module in (*model.blocks, model):
        module.register_forward_pre_hook(record)
    x, y = (dtp.distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in _data((8, 16, 4), 0))
    loss = F.mse_loss(model(x), y)
    gc.collect()
    assert len(gathered) == 10 and all(ref() is None for ref in gathered)
    assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in model.parameters())
    loss.backward()
    gc.collect()
    assert all(not m._zero_state.alive and not m._zero_state.unpacks_left for m in (*model.blocks, model))
    for p in model.parameters():
        assert isinstance(p.grad, DTensor) and p.grad.placements == (Shard(0),)


@pytest.mark.parametrize("local_compute", [True, False])
def test_stage3_frees_gathered_parameters(local_compute):
    run_on_ranks(2, _check_freed, local_compute)


def _check_errors():
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    with pytest.raises(ValueError, match="stage=1 or 2"):
        ZeroRedundancyOptimizer([], mesh, stage=3)
    with pytest.raises(TypeError, match="distribute_module"):
        ZeroRedundancyOptimizer(nn.Linear(2, 2).parameters(), mesh)
    with pytest.raises(TypeError, match="nn.Module"):
        fully_shard(torch.zeros(2), mesh)
    with pytest.raises(ValueError, match="not one of the mesh dims"):
        fully_shard(nn.Linear(2, 2), mesh, mesh_dim="tp")
    with pytest.raises(TypeError, match="CPUOffload"):
        fully_shard(nn.Linear(2, 2), mesh, offload=True)
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        ZeroRedundancyOptimizer([], mesh, bucket_cap_mb=0)


def test_errors():
    run_on_ranks(2, _check_errors)


# -- composed with tensor parallelism on a (dp, tp) mesh ---------------------------------------------------

# Megatron MLP on tp (fc1 column-wise, fc2 row-wise, head column-wise). ZeRO then shards each parameter on dp
# along a tensor dim tp leaves whole; head.bias (1-D, sharded by tp) has none and stays Replicate on dp.
TP_PLACEMENTS = {"fc1.weight": Shard(0), "fc1.bias": Shard(0), "fc2.weight": Shard(1), "head.weight": Shard(0), "head.bias": Shard(0)}


def _place_tp(name, module, mesh):
    for key, param in list(module._parameters.items()):
        full_name = f"{name.rsplit('.', 1)[-1] if name.startswith('blocks') else name}.{key}"
        placement = TP_PLACEMENTS.get(full_name, Replicate())
        dt = dtp.distribute_tensor(param.detach(), mesh, [Replicate(), placement], src_data_rank=None)
        module._parameters[key] = nn.Parameter(dt)


def _check_tp(sizes, stage):
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = _model(sizes)
    dtp.distribute_module(model, mesh, _place_tp)
    if stage == 3:
        for block in model.blocks:
            fully_shard(block, mesh, mesh_dim="dp")
        fully_shard(model, mesh, mesh_dim="dp")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        assert model.blocks[0].fc1.weight.placements == (Shard(1), Shard(0))  # dp takes the dim tp leaves
        assert model.head.bias.placements == (Replicate(), Shard(0))
    else:
        opt = ZeroRedundancyOptimizer(model.parameters(), mesh, torch.optim.AdamW, stage=stage, mesh_dim="dp", lr=1e-2, weight_decay=0.1)
    losses, comm = _steps(model, opt, mesh, sizes)
    want_losses, want_params = _single_device(sizes)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.full_tensor(), want_params[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert not comm.fallbacks, comm.fallbacks
    # dp traffic: 7 parameters sharded on dp (3 per block + head.weight) are all-gathered and their gradients
    # reduce-scattered; the 3 without a free dim (fc1.bias x 2, head.bias) have their gradients all-reduced.
    sharded = [p for p in model.parameters() if any(isinstance(q, Shard) for q in (p if stage == 3 else opt._master_of[id(p)]).placements[:1])]
    assert len(sharded) == 7
    # One collective per bucket: stages 1/2 one bucket per step; stage 3 one per unit (blocks[0], blocks[1],
    # the root) in forward, again in backward for the saved weights, and for the gradients.
    units = 3 if stage == 3 else 1
    assert comm.count("all_gather", "dp") == units * (2 if stage == 3 else 1), comm
    # The 3 tensors without a free dim: their all-reduces on dp, bucketed per unit. Reduce-scatters on dp: one
    # bucket per unit (the fc2 biases come out Partial on tp too: their tp all-reduce follows, bucketed).
    # head.weight's gradient comes out Partial on tp as well; its leaf hook (dtensor_plus/grad_layout.py)
    # reduce-scatters it to its Shard on tp, so it joins the dp bucket with the others.
    assert comm.count("all_reduce", "dp") == units, comm
    assert comm.count("reduce_scatter", "dp") == units, comm
    assert comm.count("reduce_scatter", "tp") == 1, comm
    if stage != 3:  # each dp all-gather moves (n-1)/n of the tp-local parameter
        tp_local_bytes = sum(_tp_local_numel(p) * p.element_size() for p in sharded)
        assert comm.bytes("all_gather", "dp") == tp_local_bytes // 2


def _tp_local_numel(p):
    q = p.placements[1]
    return p.numel() // 2 if isinstance(q, Shard) else p.numel()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_composed_with_tensor_parallel(stage):
    run_on_ranks(4, _check_tp, (8, 16, 4), stage)


def _check_nested_same_dim():
    """dp and tp sharding one tensor dim nest in mesh-dim order: dp splits the rows first, tp splits dp's
    block; full_tensor() puts the rows back in order (no _StridedShard needed)."""
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    whole = torch.arange(16.0, dtype=torch.float64).view(8, 2)
    dt = dtp.distribute_tensor(whole, mesh, [Shard(0), Shard(0)])
    i, j = mesh.get_coordinate()
    torch.testing.assert_close(dt._local_tensor, whole.chunk(2)[i].chunk(2)[j])
    torch.testing.assert_close(dt.full_tensor(), whole)
    torch.testing.assert_close(dt.redistribute(placements=[Shard(0), Replicate()])._local_tensor, whole.chunk(2)[i])


def test_nested_same_dim_full_tensor():
    run_on_ranks(4, _check_nested_same_dim)


def _check_stage_gradients(stage):
    """Stage 2 holds each gradient as its master's dp shard right after backward (the whole one is freed);
    stage 1 keeps the whole Partial one."""
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    model = _model((8, 16, 4))
    dtp.distribute_module(model, mesh)
    opt = ZeroRedundancyOptimizer(model.parameters(), mesh, torch.optim.AdamW, stage=stage)
    x, y = (dtp.distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in _data((8, 16, 4), 0))
    with dtp.comm_mode() as comm:
        F.mse_loss(model(x), y).backward()
    for p, master in zip(model.parameters(), opt.masters):
        if stage == 2:
            assert p.grad is None and master.grad.placements == (Shard(0),), master.grad
        else:
            assert p.grad.placements == (dtp.Partial(),) and master.grad is None, p.grad.placements
    assert comm.count("reduce_scatter") == (1 if stage == 2 else 0)  # one bucket


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_placement_after_backward(stage):
    run_on_ranks(2, _check_stage_gradients, stage)


def _check_accumulation(stage):
    """Two half-batch backwards then one step equal one full-batch step on one device."""
    sizes = (6, 10, 3)
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    model = _model(sizes)
    if stage == 3:
        fully_shard(model, mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:
        dtp.distribute_module(model, mesh)
        opt = ZeroRedundancyOptimizer(model.parameters(), mesh, torch.optim.AdamW, stage=stage, lr=1e-2)
    x, y = _data(sizes, 0)
    for half in (slice(0, B // 2), slice(B // 2, B)):
        xs, ys = (dtp.distribute_tensor(t[half], mesh, [Shard(0)], src_data_rank=None) for t in (x, y))
        (F.mse_loss(model(xs), ys) / 2).backward()
    opt.step()
    reference = _model(sizes)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    F.mse_loss(reference(x), y).backward()
    ref_opt.step()
    for (name, p), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), want.detach(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradient_accumulation(stage):
    run_on_ranks(2, _check_accumulation, stage)


def _check_small_buckets():
    """Stage 2 with a bucket cap below one weight's bytes: a reduce-scatter whenever the cap fills (here after
    each weight, gradients accumulating in reverse order: bias then weight), the rest at the end of backward;
    the training is unchanged."""
    sizes = (8, 16, 4)
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    model = _model(sizes)
    dtp.distribute_module(model, mesh)
    smallest_weight = min(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith("weight"))
    opt = ZeroRedundancyOptimizer(model.parameters(), mesh, torch.optim.AdamW, stage=2,
                                  bucket_cap_mb=smallest_weight / 2**20, lr=1e-2, weight_decay=0.1)
    losses, comm = _steps(model, opt, mesh, sizes)
    want_losses, want_params = _single_device(sizes)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.full_tensor(), want_params[name], atol=1e-5, rtol=1e-5)
    assert comm.count("reduce_scatter", "dp") == 5, comm  # one bucket per (bias, weight) pair of the 5 Linears
    assert comm.count("all_gather", "dp") == 1, comm


def test_stage2_bucket_cap():
    run_on_ranks(2, _check_small_buckets)
