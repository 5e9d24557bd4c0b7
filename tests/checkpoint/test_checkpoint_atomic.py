"""A rank SIGKILLed while writing its file leaves the previous checkpoint loadable and equal to what was saved;
the rank pool recovers (the next save on the same path succeeds and clears the dead save's leftovers)."""

import os
import shutil
import signal
import tempfile

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus import Shard, checkpoint
from dtensor_plus.checkpoint import writer
from dtensor_plus.testing import RankError, run_on_ranks


def _value(version):
    return torch.arange(24.0).reshape(6, 4) + 1000 * version


def _save(path, version, kill_rank=None):
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    state = {"w": dtp.distribute_tensor(_value(version), mesh, [Shard(0)]), "version": version}
    if torch.distributed.get_rank() == kill_rank:
        write = writer.write_safetensors

        def die_halfway(file_path, *args):  # half the bytes reach the file, then the process is gone
            _, size = write(file_path, *args)
            os.truncate(file_path, size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        writer.write_safetensors = die_halfway
    checkpoint.save(state, path)


def _load_here(path):
    state = {"w": torch.zeros(6, 4), "version": -1}
    checkpoint.load(state, path)
    return state


@pytest.mark.parametrize("kill_rank", [1, 0])  # 0 also owns the index and the rename
def test_sigkill_during_save_leaves_the_previous_checkpoint(kill_rank):
    root = tempfile.mkdtemp(prefix="dtp_ckpt_")
    path = os.path.join(root, "ckpt")
    try:
        run_on_ranks(2, _save, path, 1)
        with pytest.raises(RankError, match="died") as info:
            run_on_ranks(2, _save, path, 2, kill_rank, timeout=30)
        assert kill_rank in info.value.failed_ranks
        assert any(".tmp-" in name for name in os.listdir(root))  # the dead save's files, never published
        state = _load_here(path)
        assert state["version"] == 1 and torch.equal(state["w"], _value(1))
        run_on_ranks(2, _save, path, 3)  # a fresh pool; the save replaces the old checkpoint and the leftovers
        state = _load_here(path)
        assert state["version"] == 3 and torch.equal(state["w"], _value(3))
        assert os.listdir(root) == ["ckpt"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
