"""The fast slice of the OpInfo sweep: about 40 common ops from PyTorch's op_db, a few layouts, meshes 2 and
2x2, outputs and gradients against one device. The full sweep (every op, meshes 2, 3, 4, 2x2) writes
docs/op_coverage.md: ``python -m dtensor_plus.testing.opinfo_table --full``."""

import torch

from dtensor_plus.testing import opinfo, opinfo_backend, opinfo_compare  # torch.testing._internal inside needs expecttest (in the test extras)

FAST_OPS = [
    "add", "sub", "mul", "div.no_rounding_mode", "neg", "exp", "tanh", "sigmoid", "where", "clamp", "pow",
    "nn.functional.relu", "nn.functional.gelu", "nn.functional.silu",
    "sum", "mean", "amax", "var", "softmax", "log_softmax", "logsumexp", "cumsum", "argmax",
    "mm", "bmm", "matmul", "addmm", "nn.functional.linear",
    "t", "transpose", "permute", "reshape", "flatten", "unsqueeze", "squeeze", "cat", "stack", "split",
    "index_select", "gather", "nn.functional.layer_norm", "nn.functional.embedding",
]

# Cases the sweep finds failing today: (op, mesh shape, layout) -> what fails. Fixing one turns its xfail into
# a failure here (strict), so the entry must then be removed.
KNOWN_FAILURES: dict = {}


def _fast_cases():
    """Mesh 2: Replicate, first and last dim sharded, Partial for linear ops. Mesh 2x2: the mixed layouts
    (S0,S<last> and P,S0), or S0,S0 for 1-d inputs. About 170 cases: the sweep's cost is per case."""
    cases = opinfo.plan_cases(FAST_OPS, [(2,), (2, 2)], num_samples=1, all_dims=False)
    mixed = {(c.op, c.sample) for c in cases if len(c.mesh_shape) == 2 and len(set(c.layout)) == 2}
    def keep(c):
        if len(c.mesh_shape) == 1:
            return True
        return len(set(c.layout)) == 2 or (c.layout == ("S0", "S0") and (c.op, c.sample) not in mixed)
    return [c for c in cases if keep(c)]


def test_planner_covers_layouts_without_ranks():
    cases = opinfo.plan_cases(["mm", "add"], [(3,), (2, 2)], num_samples=1)
    mm_layouts = {(c.mesh_shape, c.layout) for c in cases if c.op == "mm"}
    assert {((3,), ("S0",)), ((3,), ("S1",)), ((3,), ("R",)), ((3,), ("P",)), ((2, 2), ("S0", "S1"))} <= mm_layouts
    assert all(c.signature for c in cases)
    assert cases == opinfo.plan_cases(["mm", "add"], [(3,), (2, 2)], num_samples=1)  # deterministic


def test_compare_names_the_mismatch():
    backend = opinfo_backend.DTENSOR_PLUS
    want = [torch.ones(3)]
    assert opinfo_compare.compare([torch.ones(3)], want, "output", backend) is None
    assert "max abs err 0.5" in opinfo_compare.compare([torch.tensor([1.0, 1.5, 1.0])], want, "output", backend)
    assert "expected (3,)" in opinfo_compare.compare([torch.ones(4)], want, "output", backend)
    assert opinfo._merge([("sharded", ""), ("wrong", "x"), ("error", "y")]) == ("wrong", "x")


def test_grad_layout_check_names_the_misplaced_gradient():
    from dtensor_plus.placements import Partial, Replicate, Shard

    class Laid:  # stands in for a DTensor: the check reads only .placements
        def __init__(self, *placements):
            self.placements = placements

    backend = type("Backend", (), {"is_distributed": lambda self, v: True, "layout": lambda self, v: opinfo_backend.layout_tokens(v.placements)})()
    expected = [(Laid(Shard(0), Replicate()), Laid(Shard(0), Partial())),  # a Partial grad of a Replicate input: deferred
                (Laid(Partial("avg")), Laid(Replicate())), (Laid(Replicate()), Laid(Replicate()))]
    assert opinfo._grad_layout_problem(*zip(*expected), backend) is None
    problem = opinfo._grad_layout_problem([Laid(Replicate()), Laid(Shard(1))], [Laid(Replicate()), Laid(Replicate())], backend)
    assert problem == "grad of input 1 is R, the input S1"
    assert opinfo._grad_layout_problem([Laid(Partial())], [Laid(Partial())], backend) == "grad of input 0 is P, the input P"


def test_fast_slice_matches_one_device():
    cases = _fast_cases()
    results = opinfo.run_cases(cases)
    bad = [f"{r.case.op} mesh={r.case.mesh_shape} layout={','.join(r.case.layout)} sample={r.case.sample}: "
           f"{r.status} {r.detail}"
           for r in results
           if r.status in ("wrong", "error", "hang", "crash", "grad layout")
           and (r.case.op, r.case.mesh_shape, r.case.layout) not in KNOWN_FAILURES]
    assert not bad, "\n".join(bad)
    checked = [r for r in results if not r.status.startswith("skipped")]
    assert len({r.case.op for r in checked}) >= len(FAST_OPS) - 2
    sharded = sum(r.status == "sharded" for r in checked)
    assert sharded >= 0.8 * len(checked), f"only {sharded} of {len(checked)} cases ran without the fallback"
