"""HSDP / MiCS: ``fully_shard(..., mesh_dim=("replicate", "shard"))`` on a 2 x 2 mesh equals one device (outputs,
input and parameter gradients, AdamW steps of an MLP and of a tiny GPT, uneven sizes, a batch with empty shards),
and its bytes on each mesh dim are exactly the paper's: all-gathers and the reduce-scatter on "shard" only,
(p-1)/p of the padded bytes, the all-reduce of the reduced shards, 2(r-1)/r of 1/p of them, on "replicate" only.
With ``set_requires_all_reduce(False)`` for the first of two microbatches (MiCS's two-hop synchronization) the
"replicate" all-reduce runs once per step, the gradients still those of one device. FSDP2's HSDP (torch's
``fully_shard`` on a 2-D DeviceMesh) trains to the same parameters (slow), as does HSDP x tp on 8 ranks (slow).

Legend: p ranks per shard group (the "shard" mesh dim), r groups (the "replicate" mesh dim).
"""

import contextlib
import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dtensor_plus as dtp
from dtensor_plus import DTensor, Partial, Replicate, Shard
from dtensor_plus.layouts import fully_shard, loss_parallel, parallelize_module, replicate
from dtensor_plus.layouts.zero_hybrid import set_requires_all_reduce
from dtensor_plus.testing import run_on_ranks

from test_zero import _model  # noqa: E402  (tests/layouts is on sys.path under pytest's rootdir)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from gpt import GPT, GPTConfig, tp_plan  # noqa: E402

HSDP = ("replicate", "shard")
SIZES, ROWS, STEPS = (6, 10, 3), 7, 3  # 7 rows over 2 x 2 ranks: 2, 2, 2, 1; every weight's rows uneven over 2
GPT_CONFIG = GPTConfig(vocab_size=13, block_size=5, num_layers=2, num_heads=3, dim=9)  # odd heads, odd widths


def _mesh():
    return dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=HSDP)


def _place(t, mesh):
    return dtp.distribute_tensor(t, mesh, [Shard(0), Shard(0)] + [Replicate()] * (mesh.ndim - 2), src_data_rank=None)


def _batch(step):
    g = torch.Generator().manual_seed(500 + step)
    return (torch.randn(ROWS, SIZES[0], generator=g, dtype=torch.float64),
            torch.randn(ROWS, SIZES[2], generator=g, dtype=torch.float64))


def _hsdp_mlp(mesh):
    model = _model(SIZES)
    for block in model.blocks:
        fully_shard(block, mesh, mesh_dim=HSDP)
    fully_shard(model, mesh, mesh_dim=HSDP)
    return model


def _paper_bytes(model, p, r, shard_index, saved_weights):
    """MiCS's bytes this rank sends in one step on each mesh dim, from the parameters' shapes: each tensor cut in
    p pieces of ceil(rows / p) rows (torch.chunk's), the gathers and the reduce-scatter sending (p-1) pieces padded
    to that size; the all-reduce across the r groups sending 2(r-1)/r of this rank's own piece, unpadded (every
    rank of a replicate group holds the same piece: nothing to pad)."""
    def piece(t, index=None):
        rows = math.ceil(t.shape[0] / p)
        if index is not None:
            rows = max(0, min(t.shape[0], (index + 1) * rows) - index * rows)
        return rows * math.prod(t.shape[1:]) * t.element_size()
    padded = sum(piece(t) for t in model.parameters())
    saved = sum(piece(t) for name, t in model.named_parameters() if name in saved_weights)
    mine = sum(piece(t, shard_index) for t in model.parameters())
    return {("all_gather", "shard"): (p - 1) * (padded + saved), ("reduce_scatter", "shard"): (p - 1) * padded,
            ("all_reduce", "replicate"): 2 * (r - 1) * mine // r}


def _one_device_mlp(microbatches):
    model = _model(SIZES)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    record = []
    for step in range(STEPS):
        x, y = _batch(step)
        x = x.requires_grad_()
        out = model(x)
        F.mse_loss(out, y).backward()
        for extra in range(1, microbatches):  # gradient accumulation: more microbatches, one step
            F.mse_loss(model(_batch(10 * step + extra)[0]), _batch(10 * step + extra)[1]).backward()
        record.append((out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
        opt.zero_grad()
    return record, {n: p.detach() for n, p in model.named_parameters()}


def _check_mlp(microbatches):
    """STEPS AdamW steps of the uneven MLP on 2 x 2 ranks: outputs, input and parameter gradients equal one
    device each step; each step's bytes per mesh dim equal the paper's exactly (``microbatches`` backwards per
    step, the replicas synchronized by the last one only)."""
    mesh = _mesh()
    model = _hsdp_mlp(mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    want, want_params = _one_device_mlp(microbatches)
    saved = {f"blocks.{i}.fc{j}.weight" for i in (0, 1) for j in (1, 2)} | {"head.weight"}  # x requires grad
    paper = _paper_bytes(_model(SIZES), p=2, r=2, shard_index=mesh.get_local_rank("shard"), saved_weights=saved)
    root = model._zero_state
    in_flight = []  # replica all-reduces in flight when the root's reduce-scatter starts (backward's last unit)
    start_reduce = root.start_reduce
    root.start_reduce = lambda grads: in_flight.append(len(root.schedule.syncing)) or start_reduce(grads)
    for step in range(STEPS):
        x, y = (_place(t, mesh) for t in _batch(step))
        x = x.requires_grad_()
        with dtp.comm_mode() as comm:
            set_requires_all_reduce(model, microbatches == 1)
            out = model(x)
            F.mse_loss(out, y).backward()
            for extra in range(1, microbatches):
                if extra == microbatches - 1:
                    for name, p in model.named_parameters():  # accumulated, each group's sum: Partial on replicate
                        assert p.grad.placements == (Partial(), Shard(0)), (name, p.grad.placements)
                    set_requires_all_reduce(model, True)
                xe, ye = (_place(t, mesh) for t in _batch(10 * step + extra))
                F.mse_loss(model(xe), ye).backward()
        assert not comm.fallbacks, comm
        got = {key: comm.bytes(*key) for key in comm.sent_bytes}
        # Every microbatch gathers and reduce-scatters; the replicas all-reduce once per step, 1/p of the bytes.
        want_bytes = {key: n * (1 if key[0] == "all_reduce" else microbatches) for key, n in paper.items()}
        if microbatches > 1:  # the later microbatches' inputs do not require grad: the first weights are not saved
            want_bytes["all_gather", "shard"] -= (microbatches - 1) * 8 * 5 * SIZES[0]  # blocks.0.fc1.weight piece
        assert got == want_bytes, (step, got, want_bytes)
        assert comm.count("all_reduce", "replicate") == 3  # one per unit: 2 blocks and the root
        # The second hop overlaps: blocks.1's all-reduce is still in flight when the root's reduce-scatter starts.
        assert in_flight[-1] == 1 and not root.schedule.syncing, in_flight
        want_out, want_x_grad, want_grads = want[step]
        torch.testing.assert_close(out.full_tensor(), want_out, msg=lambda m: f"step {step} output: {m}")
        torch.testing.assert_close(x.grad.full_tensor(), want_x_grad, msg=lambda m: f"step {step} input grad: {m}")
        for name, p in model.named_parameters():
            assert p.placements == (Replicate(), Shard(0)) and p.grad.placements == p.placements, name
            torch.testing.assert_close(p.grad.full_tensor(), want_grads[name], msg=lambda m: f"step {step} {name}: {m}")
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.full_tensor(), want_params[name], msg=lambda m: f"final {name}: {m}")


@pytest.mark.parametrize("microbatches", [1, 2])
def test_mlp_equal_to_one_device_and_paper_bytes(microbatches):
    run_on_ranks(4, _check_mlp, microbatches)


# -- a tiny GPT, AdamW steps ---------------------------------------------------------------------------------------


def _gpt_batches(rows=3):
    g = torch.Generator().manual_seed(7)
    # 3 sequences over 2 x 2 ranks: 1, 1, 1, 0 rows (an empty shard); 5 positions, vocabulary 13.
    shape = (rows, GPT_CONFIG.block_size + 1)
    return [torch.randint(0, GPT_CONFIG.vocab_size, shape, generator=g) for _ in range(STEPS)]


def _train_gpt(model, place, rows=3, vocab_sharded=False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for tokens in _gpt_batches(rows):
        with loss_parallel() if vocab_sharded else contextlib.nullcontext():  # tp's head: vocab-sharded logits
            loss = model.loss(place(tokens[:, :-1]), place(tokens[:, 1:]))
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.full_tensor() if isinstance(loss, DTensor) else loss.detach())
    return torch.stack(losses), {n: p.full_tensor() if isinstance(p, DTensor) else p.detach()
                                 for n, p in model.named_parameters()}


def _hsdp_gpt(model, mesh, tp: bool = False):
    if tp:  # tp's placements on mesh["tp"], lifted onto the whole mesh (Replicate on the other dims), as train_gpt
        parallelize_module(model, mesh["tp"], tp_plan(model.config, sequence_parallel=False))
        replicate(model, mesh, dp_mesh_dim="replicate", reduce_in_backward=False, local_compute=False)
    else:
        dtp.distribute_module(model, mesh)  # the parameters and the causal mask Replicate on both mesh dims
    for block in model.blocks:
        fully_shard(block, mesh, mesh_dim=HSDP)
    fully_shard(model, mesh, mesh_dim=HSDP)
    return model


def _check_gpt(tp: bool):
    mesh = (dtp.init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=(*HSDP, "tp")) if tp else _mesh())
    torch.manual_seed(0)
    reference = GPT(GPT_CONFIG.replace(num_heads=2, dim=8) if tp else GPT_CONFIG).double()
    model = _hsdp_gpt(copy.deepcopy(reference), mesh, tp)
    if tp:  # q column-parallel: Shard(0) on tp, so the shard group takes the columns, dim 1
        assert model.blocks[0].attn.q.weight.placements == (Replicate(), Shard(1), Shard(0))
    losses, params = _train_gpt(model, lambda t: _place(t, mesh), vocab_sharded=tp)
    want_losses, want_params = _train_gpt(reference, lambda t: t)
    torch.testing.assert_close(losses, want_losses)
    for name, p in params.items():
        torch.testing.assert_close(p, want_params[name], msg=lambda m: f"{name}: {m}")


def test_tiny_gpt_adamw_equal_to_one_device():
    run_on_ranks(4, _check_gpt, False)


@pytest.mark.slow
def test_tiny_gpt_hsdp_with_tp_on_eight_ranks():
    """(replicate, shard, tp) = 2 x 2 x 2: tp's placements kept, dp's two hops on the other two mesh dims."""
    run_on_ranks(8, _check_gpt, True)


def _check_fsdp2_oracle():
    """The same GPT, the same steps under torch's FSDP2 HSDP (fully_shard on a 2-D DeviceMesh): the same
    parameters, and the same collectives per mesh dim (all-gathers and reduce-scatters inside the shard group,
    all-reduces across it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard as torch_fully_shard
    from torch.distributed.tensor import DTensor as TorchDTensor

    torch.manual_seed(0)
    reference = GPT(GPT_CONFIG).double()
    ours = _hsdp_gpt(copy.deepcopy(reference), _mesh())
    _, our_params = _train_gpt(ours, lambda t: _place(t, ours._zero_state.mesh), rows=6)  # no empty shard:
    # FSDP2's ranks take means of their own rows
    theirs = copy.deepcopy(reference)
    torch_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=HSDP)
    for block in theirs.blocks:
        torch_fully_shard(block, mesh=torch_mesh)
    torch_fully_shard(theirs, mesh=torch_mesh)
    rank = torch.distributed.get_rank()
    opt = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1)
    for tokens in _gpt_batches(6):  # each rank its rows of the global batch, as _place gives ours
        rows = torch.tensor_split(torch.arange(tokens.shape[0]), 2)[rank // 2].tolist()
        rows = torch.tensor_split(torch.tensor(rows, dtype=torch.long), 2)[rank % 2]
        local = tokens[rows]
        loss = theirs.loss(local[:, :-1], local[:, 1:]) * local.shape[0] / tokens.shape[0]
        loss.backward()  # FSDP2 averages over the 4 ranks: scale each rank's mean to its share of the global one
        for p in theirs.parameters():
            p.grad.mul_(4)
        opt.step()
        opt.zero_grad()
    for name, p in theirs.named_parameters():
        full = p.full_tensor() if isinstance(p, TorchDTensor) else p.detach()
        torch.testing.assert_close(our_params[name], full, msg=lambda m: f"FSDP2 {name}: {m}")


@pytest.mark.slow
def test_same_parameters_as_fsdp2_hsdp():
    run_on_ranks(4, _check_fsdp2_oracle)


# -- errors ---------------------------------------------------------------------------------------------------------


def _check_errors():
    mesh = _mesh()
    with pytest.raises(ValueError, match="names one mesh dim twice"):
        fully_shard(_model(SIZES), mesh, mesh_dim=("shard", "shard"))
    with pytest.raises(ValueError, match=r"two mesh dims, \(replicate, shard\)"):
        fully_shard(_model(SIZES), mesh, mesh_dim=("replicate", "shard", "shard"))
    with pytest.raises(ValueError, match="not one of the mesh dims"):
        fully_shard(_model(SIZES), mesh, mesh_dim=("dp", "shard"))
    with pytest.raises(ValueError, match=r"HSDP mesh_dim=\('replicate', 'shard'\)|a pair"):
        fully_shard(_model(SIZES), mesh)
    with pytest.raises(ValueError, match="no replicate mesh dim"):
        set_requires_all_reduce(fully_shard(_model(SIZES), mesh, mesh_dim="shard"), False)
    with pytest.raises(ValueError, match="no fully_shard module"):
        set_requires_all_reduce(_model(SIZES), False)


def test_errors_name_the_fix():
    run_on_ranks(4, _check_errors)
