"""The activation header between pipeline stages is data only: every spec round-trips through JSON, and a hostile
header (a pickle that would run code, malformed JSON, out-of-range fields) is refused with a ValueError, on its
own and through a real pipeline step, without running anything."""

import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard, point_to_point
from dtensor_plus.placements import StridedShard
from dtensor_plus.layouts.pipeline import PipelineSchedule, PipelineStage
from dtensor_plus.layouts.pipeline.header import HEADER_BYTES, ActivationMeta
from dtensor_plus.layouts.pipeline.stage import _F_HEADER, message_tag
from dtensor_plus.testing import run_on_ranks

_placements = st.one_of(st.builds(Shard, st.integers(0, 2)), st.just(Replicate()),
                        st.builds(Partial, st.sampled_from(["sum", "avg", "max", "min"])),
                        st.builds(StridedShard, st.integers(0, 2), st.integers(1, 4), st.booleans()))


@settings(max_examples=10)
@given(local=st.lists(st.integers(0, 7), min_size=3, max_size=3), dtype=st.sampled_from([torch.float32, torch.bfloat16,
       torch.int64, torch.bool, torch.float8_e4m3fn]), placements=st.lists(_placements, min_size=1, max_size=3),
       plain=st.booleans())
def test_every_spec_round_trips(local, dtype, placements, plain):
    if plain:
        meta = ActivationMeta(tuple(local), dtype)
    else:
        names = tuple(f"d{i}" for i in range(len(placements)))
        meta = ActivationMeta(tuple(local), dtype, (5, 7, 1), (7, 1, 1), names, tuple(placements))
    header = meta.encode()
    assert header.dtype == torch.uint8 and header.shape == (HEADER_BYTES,)
    assert ActivationMeta.decode(header) == meta


class _RunsCode:
    """Unpickling this calls os.mkdir(path): what a peer could make the next rank do with a pickled header."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _header_from(payload: bytes) -> torch.Tensor:
    header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    header[:4] = torch.tensor(list(len(payload).to_bytes(4, "little")), dtype=torch.uint8)
    header[4 : 4 + len(payload)] = torch.tensor(list(payload), dtype=torch.uint8)
    return header


def _valid_fields():
    return {"format": "dtensor_plus.pipeline.header", "version": 1, "local_shape": [2, 6], "dtype": "float32",
            "global_shape": [4, 6], "stride": [6, 1], "mesh_dim_names": ["tp"], "placements": [{"kind": "shard", "dim": 0}]}


def _json_header(**changes):
    import json

    fields = dict(_valid_fields(), **changes)
    return _header_from(json.dumps({k: v for k, v in fields.items() if v != "DROP"}).encode())


@pytest.mark.parametrize("header, message", [
    (lambda path: _header_from(pickle.dumps(_RunsCode(path))), "is not JSON"),
    (lambda path: _json_header(dtype="__import__('os')"), "is not a torch dtype name"),
    (lambda path: _json_header(placements=[{"kind": "os.system", "dim": 0}]), "is not one of"),
    (lambda path: _json_header(placements=[{"kind": "shard", "dim": 5}]), "names a dim outside"),
    (lambda path: _json_header(local_shape=[2, -1]), "local_shape [2, -1] must be a list of non-negative ints"),
    (lambda path: _json_header(stride=None), "come all or none"),
    (lambda path: _json_header(extra=1), "expected exactly"),
    (lambda path: _json_header(version=2), "is not a dtensor_plus.pipeline.header version 1"),
    (lambda path: torch.full((HEADER_BYTES,), 255, dtype=torch.uint8), "does not fit"),
])
def test_hostile_headers_are_refused_without_running_code(tmp_path, header, message):
    marker = str(tmp_path / "ran")
    with pytest.raises(ValueError) as error:
        ActivationMeta.decode(header(marker))
    assert message in str(error.value)
    assert not os.path.exists(marker)


def _pipeline_receives_a_pickle(marker):
    """Rank 0 plays a hostile first stage: it builds its schedule like any stage, then sends a pickled header in
    place of the spec; rank 1 runs its stage."""
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    rank = mesh.get_rank()
    pipe = PipelineSchedule(PipelineStage(nn.Linear(3, 3), rank, 2, mesh), "1f1b", n_microbatches=1, loss_fn=F.mse_loss)
    if rank == 0:
        header = _header_from(pickle.dumps(_RunsCode(marker)))
        send, _ = point_to_point.send_recv([(header, 1, message_tag(1, 0, _F_HEADER, 2))], [], mesh, "pp")
        send.wait()
        return None
    with pytest.raises(ValueError, match="pipeline header is not JSON"):
        pipe.step(target=torch.zeros(2, 3))
    return os.path.exists(marker)


def test_a_pipeline_stage_refuses_a_pickled_header(tmp_path):
    marker = str(tmp_path / "ran")
    assert run_on_ranks(2, _pipeline_receives_a_pickle, marker) == [None, False]
    assert not os.path.exists(marker)
