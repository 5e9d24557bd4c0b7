"""The examples run on real ranks and equal one process (their own checks), without any op falling back."""

import sys
from pathlib import Path

from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import quickstart  # noqa: E402
import spmd_basics  # noqa: E402


def _run(main):
    from dtensor_plus import comm_mode

    with comm_mode() as comm:
        result = main()
    return result, dict(comm.fallbacks)


def test_quickstart_trains_like_one_process():
    for same, fallbacks in run_on_ranks(4, _run, quickstart.main):
        assert same and not fallbacks


def test_spmd_basics_matches_one_process():
    for _, fallbacks in run_on_ranks(4, _run, spmd_basics.main):
        assert not fallbacks
