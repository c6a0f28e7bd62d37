"""GPTQ holds a layer's [K, K] float64 matrices (its Hessian and what is made of it) as few times as it can
(issue 16): they were the peak of a data-aware export, and they grow with the square of a layer's input size.

Measured in a child process, so that its peak RSS is its own, in units of one such matrix."""

import json
import subprocess
import sys

import numpy as np
import onnx_ir as ir

from nanoexport.calibration.layerwise import _gather_before_cast
from nanoexport.runtime import cpu_session

# K = 3072: one [K, K] float64 matrix is 72 MiB, well above what the arithmetic around it allocates.
# VmHWM is reset (clear_refs) just before each measured step, which reports how far RSS rose above where it
# stood, in those units.
MEASURE = """
import json, sys
import numpy as np
from nanoexport.calibration.activations import StatisticsAccumulator
from nanoexport.calibration.algorithms import gptq
from nanoexport.calibration.blocks import WeightFormat

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def measured(step):
    start = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    result = step()
    return result, (status("VmHWM") - start) / UNIT

rows = int(sys.argv[1])
UNIT = rows * rows * 8
generator = np.random.default_rng(0)
windows = [generator.standard_normal((1, 256, rows)).astype(np.float32) for _ in range(4)]
weight = generator.standard_normal((rows, 64)).astype(np.float32)
accumulator = StatisticsAccumulator()
accumulator.add(["x"], [windows[0]])  # the sum exists: what is measured is what adding a window costs
_, capture = measured(lambda: [accumulator.add(["x"], [window]) for window in windows[1:]])
statistics, collect = measured(lambda: accumulator.collect(1024))
del accumulator
_, factor = measured(lambda: gptq(weight, statistics["x"].hessian, WeightFormat("int4", 32)))
print(json.dumps({"capture": capture, "collect": collect, "gptq": factor}))
"""


def test_gptq_and_its_statistics_hold_few_hessian_sized_matrices():
    result = subprocess.run([sys.executable, "-c", MEASURE, "3072"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rise = json.loads(result.stdout.strip().splitlines()[-1])
    # Measured 1.0, 0.0 and 4.0: the Gram product of a window; nothing (the Hessian is the Gram matrix, scaled
    # in place); numpy's inv of the Cholesky factor, which holds three matrices of its own, beside that factor.
    # GPTQ rose 7.0 before: the Hessian made anew from the Gram matrix at each use, two damped copies, and every
    # intermediate of the factorization alive to the end.
    assert rise["capture"] < 1.5, rise
    assert rise["collect"] < 0.5, rise
    assert rise["gptq"] < 5.0, rise


def test_a_gather_from_a_cast_table_gathers_then_casts():
    """A calibration session gathers from the fp16 table and casts the rows (ONNX Runtime folded the Cast of the
    whole table into a float32 copy), with the values the graph computes."""
    table = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float16)
    ids = ir.val("ids", ir.DataType.INT64, ir.Shape([1, 5]))
    initializer = ir.Value(name="table", const_value=ir.tensor(table, name="table"))
    cast = ir.node("Cast", [initializer], attributes={"to": ir.DataType.FLOAT})
    gather = ir.node("Gather", [cast.outputs[0], ids], attributes={"axis": 0})
    rows = gather.outputs[0]
    rows.name, rows.dtype, rows.shape = "rows", ir.DataType.FLOAT, ir.Shape([1, 5, 8])
    graph = ir.Graph([ids], [rows], nodes=[cast, gather], initializers=[initializer], opset_imports={"": 23})
    _gather_before_cast(graph)
    assert [node.op_type for node in graph] == ["Gather", "Cast"]
    assert graph.outputs[0].name == "rows"
    session = cpu_session(ir.Model(graph, ir_version=10))
    feed = np.array([[3, 0, 49, 3, 7]], np.int64)
    (computed,) = session.run(["rows"], {"ids": feed})
    assert computed.dtype == np.float32 and np.array_equal(computed, table.astype(np.float32)[feed])
