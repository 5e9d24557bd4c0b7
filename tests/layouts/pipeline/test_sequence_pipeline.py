"""Sequence-level pipelines (Seq1F1B, TeraPipe) executed equal one device: a GPT (examples/pipeline_gpt.py's stages,
chunked causal attention) trains two AdamW steps on real gloo ranks with the single-device loss (the mean over
every token) and every parameter's gradient (fp32, 1e-5), T not divisible by k; the keys and values cache is gone
after each step. In one process (hypothesis): a GPT run chunk by chunk, backwards last chunk first, gives the
whole sequence's loss and gradients, the matmul and SDPA attention alike. k = 1 is 1F1B / GPipe; B/W splits and
stage modules without ``sequence_chunk=`` are refused.

Legend: B batch, T sequence, V vocabulary.
"""

import copy
import gc
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus.layouts.pipeline import Action, Kind, PipelineSchedule, PipelineStage, gpipe, one_f_one_b
from dtensor_plus.layouts.pipeline.schedules import with_communication
from dtensor_plus.layouts.pipeline.schedules_sequence import seq1f1b, terapipe
from dtensor_plus.layouts.pipeline.sequence_chunks import KeyValueCache, SequenceSplit, chunk_lengths
from dtensor_plus.layouts.pipeline.microbatch import merge_sequence_microbatches, split_sequence_microbatches
from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))

from gpt import GPT, GPTConfig  # noqa: E402
from pipeline_gpt import gpt_loss, split_gpt  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
STEPS, LR = 2, 1e-2


def _config(p, heads=3, attention="matmul"):
    return GPTConfig(vocab_size=11, block_size=16, num_layers=p, num_heads=heads, dim=3 * heads, attention=attention)


def _batch(samples, T, step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 11, (2 * samples, T), generator=g), torch.randint(0, 11, (2 * samples, T), generator=g)


def _train_pipelined(name, m, k, T):
    """This rank's stage of a GPT trained STEPS AdamW steps by schedule ``name``: per step (weighted loss or None,
    {model parameter name: gradient}), and the reference run on one device: per step (loss, gradients)."""
    p, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    mesh = dtp.init_device_mesh("cpu", (p,), mesh_dim_names=("pp",))
    torch.manual_seed(0)
    model = GPT(_config(p))
    reference = copy.deepcopy(model)
    piece = split_gpt(model, p)[rank]
    stage = PipelineStage(piece, rank, p, mesh)
    pipe = PipelineSchedule(stage, name, n_microbatches=m, loss_fn=gpt_loss, sequence_chunks=k)
    opt = torch.optim.AdamW(piece.parameters(), lr=LR)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR)
    got, want = [], []
    for step in range(STEPS):
        tokens, targets = _batch(m, T, step)
        losses = []
        pipe.step(tokens, target=targets, losses=losses)
        loss = sum(w * x for w, x in zip(pipe.loss_weights, losses)) if losses else None
        got.append((loss, {piece.model_name(n): q.grad.clone() for n, q in piece.named_parameters()}))
        opt.step()
        opt.zero_grad()
        ref_loss = gpt_loss(reference(tokens), targets)
        ref_loss.backward()
        want.append((ref_loss.detach(), {n: q.grad.clone() for n, q in reference.named_parameters()}))
        ref_opt.step()
        ref_opt.zero_grad()
    return got, want, stage.is_last


def _check_equal(name, m, k, T):
    got, want, is_last = _train_pipelined(name, m, k, T)
    for (loss, grads), (ref_loss, ref_grads) in zip(got, want):
        if is_last:
            torch.testing.assert_close(loss, ref_loss, **TOL)
        else:
            assert loss is None
        assert grads
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], **TOL, msg=lambda e, n=n: f"{name} k={k} T={T} {n}: {e}")


def _check_refusals():
    """A schedule with sequence chunks and a B/W split, and a stage module without ``sequence_chunk=``, refused."""
    p, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    mesh = dtp.init_device_mesh("cpu", (p,), mesh_dim_names=("pp",))
    torch.manual_seed(0)
    piece = split_gpt(GPT(_config(p)), p)[rank]
    stage = PipelineStage(piece, rank, p, mesh)
    order = [Action(Kind.F, 0, 0), Action(Kind.F, 0, 1), Action(Kind.B, 0, 1), Action(Kind.B, 0, 0),
             Action(Kind.W, 0, 1), Action(Kind.W, 0, 0)]
    compute = [[Action(a.kind, r, a.microbatch) for a in order] for r in range(p)]
    split_backward = with_communication("zb_chunks", 2, range(p), compute, sequence_chunks=2)
    with pytest.raises(ValueError, match="fused BW"):
        PipelineSchedule(stage, split_backward, loss_fn=gpt_loss)
    plain = PipelineStage(torch.nn.Linear(2, 2), rank, p, mesh)
    with pytest.raises(TypeError, match="sequence_chunk="):
        PipelineSchedule(plain, "seq1f1b", n_microbatches=1, sequence_chunks=2)
    with pytest.raises(ValueError, match="sequence_chunks=2 goes with"):
        PipelineSchedule(stage, "1f1b", n_microbatches=1, sequence_chunks=2)


def _two_ranks():
    _check_refusals()
    _check_equal("seq1f1b", 2, 3, 7)  # 7 positions in chunks of 3, 2, 2
    _check_equal("terapipe", 1, 2, 5)
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, KeyValueCache)], "keys and values outlived the steps"


def test_seq1f1b_and_terapipe_train_like_one_device():
    run_on_ranks(2, _two_ranks)


# name, samples, k, T: k dividing T and not, k = T (one position a chunk), k = 1 (1F1B, GPipe through the same path)
WIDE = [("seq1f1b", 3, 2, 8), ("seq1f1b", 2, 4, 9), ("seq1f1b", 1, 5, 5), ("terapipe", 2, 3, 10), ("seq1f1b", 2, 1, 6),
        ("terapipe", 2, 1, 6)]


@pytest.mark.slow
@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("case", WIDE, ids=lambda c: "-".join(map(str, c)))
def test_sequence_schedules_wide(case, p):
    run_on_ranks(p, _check_equal, *case)


@pytest.mark.parametrize("p,m", [(2, 3), (4, 5)])
def test_one_chunk_is_1f1b_and_gpipe(p, m):
    def compute(schedule):
        return [[a for a in acts if a.kind.is_compute] for acts in schedule.actions]

    assert compute(seq1f1b(p, m, 1)) == compute(one_f_one_b(p, m))
    assert compute(terapipe(p, m, 1)) == compute(gpipe(p, m))
    assert seq1f1b(p, m, 1).sequence_chunks == 1  # the executor's whole-microbatch path


@settings(max_examples=6, deadline=None)
@given(T=st.integers(1, 9), k=st.integers(1, 9), heads=st.sampled_from([1, 3]),
       attention=st.sampled_from(["matmul", "sdpa"]))
def test_chunks_in_one_process_equal_the_whole_sequence(T, k, heads, attention):
    """The GPT as one stage run chunk by chunk, backwards from the last chunk (each chunk's keys and values released
    after its backward), equals the whole-sequence pass."""
    k = min(k, T)
    torch.manual_seed(0)
    model = GPT(_config(2, heads, attention))
    whole = copy.deepcopy(model)
    piece = split_gpt(model, 1)[0]
    tokens, targets = _batch(1, T, 0)
    split = SequenceSplit(1, k, T)
    chunks = split_sequence_microbatches(tokens, 1, split.lengths)
    chunk_targets = split_sequence_microbatches(targets, 1, split.lengths)
    cache = KeyValueCache(0, 0)
    roots, logits = [], []
    for u in range(k):
        out = piece(chunks[u], sequence_chunk=split.chunk(u, cache))
        logits.append(out.detach())
        roots.append(gpt_loss(out, chunk_targets[u]) * split.loss_weight(u))
    for u in reversed(range(k)):  # as a stage runs them: last chunk first, each chunk's leaves let go after it
        roots[u].backward()
        cache.release(u)
    want = whole(tokens)
    gpt_loss(want, targets).backward()
    torch.testing.assert_close(merge_sequence_microbatches(logits, k), want.detach(), **TOL)
    torch.testing.assert_close(sum(r.detach() for r in roots), gpt_loss(want, targets).detach(), **TOL)
    ref = dict(whole.named_parameters())
    for n, q in piece.named_parameters():
        torch.testing.assert_close(q.grad, ref[n].grad, **TOL, msg=lambda e, n=n: f"{n}: {e}")


def test_chunk_lengths_and_bad_input():
    assert chunk_lengths(7, 3) == (3, 2, 2) and chunk_lengths(4, 4) == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="at most 3 sequence chunks"):
        chunk_lengths(3, 4)
    with pytest.raises(ValueError, match="along dim 1"):
        split_sequence_microbatches(torch.zeros(2, 5), 1, (2, 2))
    cache, split = KeyValueCache(0, 0), SequenceSplit(1, 2, 4)
    with pytest.raises(RuntimeError, match="in order"):  # chunk 1 before chunk 0
        split.chunk(1, cache).keys_values("layer", torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1))
    cache, kv = KeyValueCache(0, 0), torch.zeros(1, 1, 2, 1)
    split.chunk(0, cache).keys_values("layer", kv, kv)
    cache.release(0)  # chunk 0's backward ran: no forward of its sample may follow
    with pytest.raises(RuntimeError, match="after a backward"):
        split.chunk(1, cache).keys_values("layer", kv, kv)


def _compare_example(schedule, k, dp=1, zero=0):
    from gpt_layouts import Layout
    from pipeline_gpt import compare_pipeline_with_single

    config = _config(2)
    batch_list = [_batch(2, 9, step) for step in range(2)]  # 4 rows: 2 samples of 2 rows, 1 row per dp rank
    losses, single, diff = compare_pipeline_with_single(config, Layout(dp=dp, zero=zero), pp=2, schedule=schedule,
                                                        n_microbatches=2, batch_list=batch_list, sequence_chunks=k)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single), **TOL)
    assert diff < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["seq1f1b", "terapipe"])
def test_pipeline_gpt_example_with_sequence_chunks(schedule):
    """examples/pipeline_gpt.py (what train_gpt.py --pp 2 --schedule seq1f1b --seq-chunks 4 runs) equals one device."""
    run_on_ranks(2, _compare_example, schedule, 4)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 2])
def test_sequence_chunks_with_data_parallel_stages(zero):
    """pp 2 x dp 2 (replicate, or ZeRO-2): each dp rank's rows chunked, the activations DTensors Shard(0) on dp."""
    run_on_ranks(4, _compare_example, "seq1f1b", 3, 2, zero)


def test_pipeline_gpt_refuses_sequence_chunks_with_tp():
    from gpt_layouts import Layout
    from pipeline_gpt import compare_pipeline_with_single

    with pytest.raises(ValueError, match="drop --tp"):
        compare_pipeline_with_single(_config(2), Layout(tp=2), pp=2, schedule="seq1f1b", n_microbatches=1,
                                     batch_list=[], sequence_chunks=2)
