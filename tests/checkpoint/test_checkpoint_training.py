"""Resuming training: a ZeRO-3 model and its AdamW state saved on 4 ranks load on 2 ranks and on one process
(no torch.distributed) bit for bit, and the resumed run's next step matches the uninterrupted one. Also
asynchronous save, tensor-parallel weights, and a save error raised on every rank alike (no hang)."""

import shutil
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, Shard, checkpoint
from dtensor_plus.layouts.zero import ZeroRedundancyOptimizer, fully_shard
from dtensor_plus.testing import RankError, run_on_ranks

B = 8


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 10), nn.Linear(10, 6)])
        self.head = nn.Linear(6, 3)  # 3 rows over 4 ranks: uneven, one empty shard

    def forward(self, x_BD):
        for block in self.blocks:
            x_BD = F.gelu(block(x_BD))
        return self.head(x_BD)


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(B, 6, generator=g, dtype=torch.float64), torch.randn(B, 3, generator=g, dtype=torch.float64)


def _setup(world: int, zero: int = 3):
    """The model and AdamW, ZeRO-3 (or ZeRO-2's sharded optimizer) on a ``world``-rank dp mesh (world 0: one
    plain process)."""
    torch.manual_seed(0)
    model = MLP().double()
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    if not world:
        return model, torch.optim.AdamW(model.parameters(), **kwargs), None
    mesh = dtp.init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    if zero == 2:
        dtp.distribute_module(model, mesh)
        return model, ZeroRedundancyOptimizer(model.parameters(), mesh, torch.optim.AdamW, stage=2, **kwargs), mesh
    for block in model.blocks:
        fully_shard(block, mesh)
    fully_shard(model, mesh)
    return model, torch.optim.AdamW(model.parameters(), **kwargs), mesh


def _step(model, opt, mesh, step):
    x, y = _batch(step)
    if mesh is not None:
        x, y = (dtp.distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in (x, y))
    F.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def _full(state):
    """Every tensor of a state as a whole plain tensor, keyed by dotted path."""
    out = {}

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            out[path] = node.full_tensor() if isinstance(node, DTensor) else node.clone()
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}")
    walk(state, "")
    return out


def _train_and_save(path, zero=3):
    model, opt, mesh = _setup(torch.distributed.get_world_size(), zero)
    for step in range(2):
        _step(model, opt, mesh, step)
    state = checkpoint.get_state_dict(model, opt)
    state["step"] = 2
    checkpoint.save(state, path)
    saved = _full(state)
    _step(model, opt, mesh, 2)
    return saved, {k: v.full_tensor() for k, v in model.state_dict().items()}


def _resume(path, world, zero=3):
    model, opt, mesh = _setup(world, zero)
    state = checkpoint.get_state_dict(model, opt)
    state["step"] = 0
    checkpoint.load(state, path)
    checkpoint.set_state_dict(model, opt, state)
    loaded = _full(checkpoint.get_state_dict(model, opt))
    _step(model, opt, mesh, state["step"])
    params = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    return state["step"], loaded, params


def _resume_on_ranks(path, zero=3):
    return _resume(path, torch.distributed.get_world_size(), zero)


def test_zero3_adamw_saved_on_4_ranks_resumes_on_2_ranks_and_on_one_process():
    path = tempfile.mkdtemp(prefix="dtp_ckpt_") + "/ckpt"
    try:
        saved, continued = run_on_ranks(4, _train_and_save, path)[0]
        for step, loaded, params in [run_on_ranks(2, _resume_on_ranks, path)[0], _resume(path, 0)]:
            assert step == 2
            assert saved.keys() == loaded.keys() and any("exp_avg_sq" in k for k in saved)
            for key in saved:  # the state as saved, bit for bit, in the new layout
                assert torch.equal(loaded[key], saved[key]), key
            for key, want in continued.items():  # one more step continues the 4-rank run (other reduction order)
                torch.testing.assert_close(params[key], want, rtol=1e-12, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}")
    finally:
        shutil.rmtree(path.rsplit("/", 1)[0], ignore_errors=True)


def test_zero2_resumes_on_2_ranks():
    """ZeRO-1/2 step on master shards the model does not hold: a load must refresh them from the loaded
    parameters, or the next step starts from stale masters."""
    path = tempfile.mkdtemp(prefix="dtp_ckpt_") + "/ckpt"
    try:
        _, continued = run_on_ranks(4, _train_and_save, path, 2)[0]
        step, _, params = run_on_ranks(2, _resume_on_ranks, path, 2)[0]
        assert step == 2
        for key, want in continued.items():
            torch.testing.assert_close(params[key], want, rtol=1e-12, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}")
    finally:
        shutil.rmtree(path.rsplit("/", 1)[0], ignore_errors=True)


def _async_then_mutate(path):
    mesh = dtp.init_device_mesh("cpu", (2,))
    w = dtp.distribute_tensor(torch.arange(12.0).reshape(4, 3), mesh, [Shard(0)])
    pending = checkpoint.save({"w": w, "step": 3}, path, async_save=True)
    w._local_tensor.add_(100.0)  # training goes on: the save holds its own host copy
    pending.wait()
    state = {"w": dtp.distribute_tensor(torch.zeros(4, 3), mesh, [Replicate()]), "step": 0}
    checkpoint.load(state, path)
    return torch.equal(state["w"].full_tensor(), torch.arange(12.0).reshape(4, 3)) and state["step"] == 3


def test_async_save_writes_the_values_at_save_time():
    path = tempfile.mkdtemp(prefix="dtp_ckpt_") + "/ckpt"
    try:
        assert run_on_ranks(2, _async_then_mutate, path) == [True, True]
    finally:
        shutil.rmtree(path.rsplit("/", 1)[0], ignore_errors=True)


def _save_mismatched(path, what):
    rank = torch.distributed.get_rank()
    bias = torch.zeros(3 + rank) if what == "shape" else torch.full((3,), float(rank))
    checkpoint.save({"bias": bias}, path)


@pytest.mark.parametrize("what, message", [("shape", r"bias: shape is \[4\] on rank 1 but \[3\] on rank 0"),
                                           ("value", r"plain tensor bias differs between rank 0 and rank 1")])
def test_a_save_error_raises_on_every_rank_and_publishes_nothing(what, message):
    path = tempfile.mkdtemp(prefix="dtp_ckpt_") + "/ckpt"
    try:
        with pytest.raises(RankError, match=message) as info:
            run_on_ranks(2, _save_mismatched, path, what)
        assert info.value.failed_ranks == [0, 1]
        with pytest.raises(FileNotFoundError, match="no checkpoint at"):
            checkpoint.load({"bias": torch.zeros(3)}, path)
    finally:
        shutil.rmtree(path.rsplit("/", 1)[0], ignore_errors=True)


def _stages_and_experts(whole, experts):
    """pp=2 x tp=2: each pipeline stage's ranks hold only their stage's layer (tp-sharded on the stage's tp
    submesh); each rank holds only its own expert (ep over all ranks, plain tensors)."""
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    stage, rank = mesh.get_coordinate()[0], torch.distributed.get_rank()
    layer = nn.Linear(4, 5) if stage == 0 else nn.Linear(5, 4)
    for name, placement in [("weight", Shard(0)), ("bias", Replicate())]:
        value = dtp.distribute_tensor(whole[f"layers.{stage}.{name}"], mesh["tp"], [placement], src_data_rank=None)
        setattr(layer, name, nn.Parameter(value))
    model = nn.Module()
    model.layers = nn.ModuleDict({str(stage): layer})  # stage s holds only "layers.s.*"
    model.register_buffer(f"expert{rank}", experts[rank].clone())
    opt = torch.optim.AdamW(model.parameters(), lr=0.5 + stage)
    checkpoint.save(checkpoint.get_state_dict(model, opt), whole["path"])


def test_pipeline_stages_and_experts_held_by_different_ranks_load_as_one_model():
    path = tempfile.mkdtemp(prefix="dtp_ckpt_") + "/ckpt"
    try:
        g = torch.Generator().manual_seed(1)
        whole = {"path": path, "layers.0.weight": torch.randn(5, 4, generator=g), "layers.0.bias": torch.randn(5, generator=g),
                 "layers.1.weight": torch.randn(4, 5, generator=g), "layers.1.bias": torch.randn(4, generator=g)}
        experts = [torch.full((3,), float(e)) for e in range(4)]
        run_on_ranks(4, _stages_and_experts, whole, experts)
        model = nn.Module()
        model.layers = nn.ModuleDict({"0": nn.Linear(4, 5), "1": nn.Linear(5, 4)})
        for e in range(4):
            model.register_buffer(f"expert{e}", torch.zeros(3))
        opt = torch.optim.AdamW([{"params": model.layers["0"].parameters()}, {"params": model.layers["1"].parameters()}])
        state = checkpoint.get_state_dict(model, opt)
        checkpoint.load(state, path)
        checkpoint.set_state_dict(model, opt, state)
        for key, want in whole.items():
            if key != "path":
                assert torch.equal(model.get_parameter(key), want), key
        for e in range(4):
            assert torch.equal(getattr(model, f"expert{e}"), experts[e])
        assert [group["lr"] for group in opt.param_groups] == [0.5, 1.5]  # each stage's own hyperparameters
    finally:
        shutil.rmtree(path.rsplit("/", 1)[0], ignore_errors=True)
