"""Multi-output rewrite rules matched among nearby nodes still rewrite, and keep the numbers."""

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript.rewriter
from onnx import TensorProto, helper

from nanoexport.passes.optimize import DEFAULT_RULES


def _halves_model(pairs: int) -> onnx.ModelProto:
    """``pairs`` tensors, each cut into halves by two Slices (rotary's rotate_half) and put back swapped."""
    nodes, inputs, outputs = [], [], []
    constants = [helper.make_tensor(name, TensorProto.INT64, [1], [value])
                 for name, value in (("zero", 0), ("half", 4), ("end", 8), ("axis", -1))]
    for index in range(pairs):
        inputs.append(helper.make_tensor_value_info(f"x{index}", TensorProto.FLOAT, [2, 8]))
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, [2, 8]))
        nodes += [
            helper.make_node("Slice", [f"x{index}", "zero", "half", "axis"], [f"low{index}"]),
            helper.make_node("Slice", [f"x{index}", "half", "end", "axis"], [f"high{index}"]),
            helper.make_node("Concat", [f"high{index}", f"low{index}"], [f"y{index}"], axis=-1),
        ]
    graph = helper.make_graph(nodes, "halves", inputs, outputs, initializer=constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _run(model: ir.Model, feeds: dict) -> list:
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    return session.run(None, feeds)


def test_sibling_slices_become_splits():
    """onnxscript's all-pairs matcher stops at its first structural match, the same Slice twice, which the
    rule's check then refuses, so with it these pairs stay Slices; the sibling matcher pairs the halves."""
    model = ir.serde.deserialize_model(_halves_model(pairs=3))
    feeds = {f"x{index}": np.random.default_rng(index).standard_normal((2, 8), dtype=np.float32) for index in range(3)}
    before = _run(model, feeds)
    onnxscript.rewriter.rewrite(model, DEFAULT_RULES)
    op_counts = collections.Counter(node.op_type for node in model.graph)
    assert op_counts == {"Split": 3, "Concat": 3}
    for expected, actual in zip(before, _run(model, feeds)):
        np.testing.assert_array_equal(actual, expected)
