"""What dtensor_plus marks for torch.compile when torch._dynamo is imported (tracing.after_dynamo_import) is marked
whatever the import order: the DTensor front doors recorded as calls (``nonstrict_trace``), the MoE layer run
eagerly (``torch._dynamo.disable``) and the 2-D layout's check of the rules in force answered at trace time
(``tracing.constant_when_traced``). Each registers its own callback; with the layouts imported before
torch._dynamo, only the last registered used to run, leaving the front doors unmarked (Dynamo then traced into
the planner and broke the graph at every redistribute). A fresh interpreter, since this process has imported
torch._dynamo long ago."""

import subprocess
import sys

CHECK = """
import dtensor_plus.layouts.moe, dtensor_plus.layouts.tensor_2d  # two callbacks besides dtensor.py's, pending
import torch._dynamo
from torch._dynamo import trace_rules
from dtensor_plus import DTensor
from dtensor_plus.layouts.moe import MoE
from dtensor_plus.layouts.tensor_2d import _summa_in_force
doors = [trace_rules.is_nonstrict_trace_callable(getattr(DTensor, name))
         for name in ("from_local", "to_local", "redistribute", "full_tensor")]
print(doors, hasattr(MoE.forward, "_torchdynamo_disable"), getattr(_summa_in_force, "_dynamo_marked_constant", False))
"""


def test_every_callback_runs_when_dynamo_is_imported_after_the_layouts():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "[True, True, True, True] True True", result.stdout
