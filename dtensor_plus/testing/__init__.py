"""Public test kit: a pool of real gloo ranks, the single-device oracle, and hypothesis strategies.

    from dtensor_plus.testing import run_on_ranks, assert_spmd_equal

    def check(shape):                       # module-level: it is pickled by reference to the ranks
        mesh = init_device_mesh("cpu", (4,))
        x = distribute_tensor(torch.randn(shape, requires_grad=True), mesh, [Shard(0)])
        assert_spmd_equal(torch.softmax, x, -1)

    run_on_ranks(4, check, (6, 3))
"""

from .pool import RankError, run_on_ranks, shutdown_pools
from .spmd import assert_spmd_equal, full

__all__ = ["run_on_ranks", "RankError", "shutdown_pools", "assert_spmd_equal", "full"]
