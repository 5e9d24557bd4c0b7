"""Load errors name the key or file and what to do; nothing loads a pickle; an index cannot point outside its
directory. One process, no torch.distributed."""

import json
import os
import pickle

import pytest
import torch

from dtensor_plus import checkpoint
from dtensor_plus.checkpoint.index import INDEX_NAME, write_index


def _state():
    return {"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}, "step": 4,
            "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}


@pytest.fixture
def saved(tmp_path):
    path = str(tmp_path / "ckpt")
    checkpoint.save(_state(), path)
    return path


def _rewrite_index(path, change):
    """Edit the index and write its digest anew, as a buggy writer would: the checks behind the digest must hold."""
    with open(os.path.join(path, INDEX_NAME)) as f:
        index = json.load(f)
    change(index)
    write_index(path, index)


def test_round_trip_restores_tensors_and_values(saved):
    state = {"model": {"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}, "step": 0,
             "groups": [{"lr": 1.0, "betas": (0.0, 0.0)}]}
    checkpoint.load(state, saved)
    assert torch.equal(state["model"]["w"], _state()["model"]["w"])
    assert torch.equal(state["model"]["b"], torch.ones(3, dtype=torch.bfloat16))
    assert state["step"] == 4 and state["groups"] == [{"lr": 0.1, "betas": (0.9, 0.99)}]


def test_missing_and_unexpected_keys_are_named(saved):
    state = _state()
    del state["model"]["b"]
    state["model"]["extra"] = torch.zeros(1)
    expected = r"not in the checkpoint: model\.extra.*not in the state: model\.b.*strict=False"
    with pytest.raises(checkpoint.CheckpointKeyError, match=expected) as info:
        checkpoint.load(state, saved)
    assert info.value.missing == ["model.extra"] and info.value.unexpected == ["model.b"]
    del state["model"]["extra"]
    checkpoint.load(state, saved, strict=False)  # only the checkpoint's extra key: ignored when not strict
    with pytest.raises(checkpoint.CheckpointKeyError, match=r"model\.extra"):
        checkpoint.load({**state, "model": {**state["model"], "extra": torch.zeros(1)}}, saved, strict=False)


def test_shape_and_dtype_mismatch_name_the_key(saved):
    state = _state()
    state["model"]["w"] = torch.zeros(3, 2)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"model\.w: the checkpoint holds shape \[2, 3\], the state \[3, 2"):
        checkpoint.load(state, saved)
    state = _state()
    state["model"]["b"] = torch.zeros(3)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"model\.b: the checkpoint holds bfloat16, the state torch\.float"):
        checkpoint.load(state, saved)
    state = _state()
    state["step"] = torch.zeros(())
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"step: the state holds a tensor"):
        checkpoint.load(state, saved)


def test_corrupted_and_truncated_files_are_named(saved):
    name = next(f for f in os.listdir(saved) if f.endswith(".safetensors"))
    file_path = os.path.join(saved, name)
    data = bytearray(open(file_path, "rb").read())
    data[-1] ^= 0xFF  # one flipped bit pattern in the tensor bytes: same size, other checksum
    open(file_path, "wb").write(data)
    crc_error = rf"{name}, chunk .* of tensor model\.b .*crc32 .* differs .*restore the checkpoint"
    with pytest.raises(checkpoint.CheckpointCorruptError, match=crc_error):
        checkpoint.load(_state(), saved)
    open(file_path, "wb").write(data[:-5])
    size_error = rf"{name} \(holding tensor model\.\w\) has {len(data) - 5} bytes, its index says {len(data)}"
    with pytest.raises(checkpoint.CheckpointCorruptError, match=size_error):
        checkpoint.load(_state(), saved, verify=False)  # size is checked even without the checksum
    os.remove(file_path)
    with pytest.raises(checkpoint.CheckpointCorruptError, match=rf"{name} \(holding tensor model\.\w\) is missing"):
        checkpoint.load(_state(), saved)


def test_newer_format_version_says_upgrade(saved):
    _rewrite_index(saved, lambda index: index.update(version=99))
    with pytest.raises(checkpoint.CheckpointVersionError, match=r"format version 99, newer than .* \(2\); upgrade dtensor_plus"):
        checkpoint.load(_state(), saved)


def test_index_cannot_name_a_file_outside_the_checkpoint(saved, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x")
    name = next(f for f in os.listdir(saved) if f.endswith(".safetensors"))

    def escape(index):
        index["files"]["../outside.safetensors"] = index["files"].pop(name)
        for entry in index["tensors"]:
            for chunk in entry["chunks"]:
                chunk["file"] = "../outside.safetensors"
    _rewrite_index(saved, escape)
    with pytest.raises(checkpoint.CheckpointCorruptError, match=r"'\.\./outside\.safetensors' would read outside"):
        checkpoint.load(_state(), saved)


def test_symlink_out_of_the_checkpoint_is_refused(saved, tmp_path):
    name = next(f for f in os.listdir(saved) if f.endswith(".safetensors"))
    os.replace(os.path.join(saved, name), tmp_path / "moved.safetensors")
    os.symlink(tmp_path / "moved.safetensors", os.path.join(saved, name))
    with pytest.raises(checkpoint.CheckpointCorruptError, match="would read outside"):
        checkpoint.load(_state(), saved)


def test_loading_never_unpickles(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load called an unpickler")
    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    checkpoint.load(_state(), saved)
    assert not any(f.endswith((".pt", ".pkl", ".bin")) for f in os.listdir(saved))


def test_values_that_are_not_json_are_refused_at_save(tmp_path):
    with pytest.raises(checkpoint.CheckpointSaveError, match=r"TypeError: state value at opt\.ids is a set.*never pickles"):
        checkpoint.save({"opt": {"ids": {1, 2}}}, str(tmp_path / "ckpt"))


def test_missing_checkpoint_and_interrupted_publish(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint.load(_state(), str(tmp_path / "nothing"))
    # A save killed between its two publish renames: the previous checkpoint is intact beside the path.
    os.rename(saved, saved + ".old-123")
    with pytest.raises(FileNotFoundError, match=r"previous checkpoint is intact at .*ckpt\.old-123: rename it to"):
        checkpoint.load(_state(), saved)


def test_publish_replaces_an_existing_checkpoint_and_clears_leftovers(tmp_path, saved):
    os.mkdir(saved + ".tmp-stale")
    state = _state()
    state["step"] = 5
    checkpoint.save(state, saved)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no .tmp- or .old- directory left
    loaded = _state()
    checkpoint.load(loaded, saved)
    assert loaded["step"] == 5
    assert sorted(f for f in os.listdir(saved) if not f.endswith(".safetensors")) == [INDEX_NAME, INDEX_NAME + ".sha256"]


def test_files_are_standard_safetensors(tmp_path):
    """Our streaming writer's files read back with the safetensors library itself, every dtype and a scalar."""
    from safetensors.torch import load_file

    state = {"f": torch.randn(3, 2), "bf": torch.randn(5).bfloat16(), "i8": torch.arange(-3, 3, dtype=torch.int8),
             "flag": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5, dtype=torch.float64)}
    path = str(tmp_path / "ckpt")
    checkpoint.save(state, path)
    (name,) = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    loaded = load_file(os.path.join(path, name))
    assert sorted(loaded) == sorted(f'["{k}"]' for k in state)
    for key, want in state.items():
        got = loaded[f'["{key}"]']
        assert got.dtype == want.dtype and torch.equal(got, want), key


def test_unsupported_dtype_is_named_at_save(tmp_path):
    with pytest.raises(checkpoint.CheckpointSaveError, match=r"tensor z: dtype torch\.complex64 cannot be stored"):
        checkpoint.save({"z": torch.zeros(2, dtype=torch.complex64)}, str(tmp_path / "ckpt"))
    assert os.listdir(tmp_path) == []  # the temporary directory is gone too
