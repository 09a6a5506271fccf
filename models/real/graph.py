"""A small ONNX graph builder: named nodes, initializers from numpy, shared constants.

The converters in this folder write their graphs by hand with it, from the weights a package
ships, so that a real model reaches ONNX without PyTorch.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class Graph:
    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._names: dict = {}
        self._constants: dict = {}

    def fresh(self, prefix: str) -> str:
        count = self._names.get(prefix, 0)
        self._names[prefix] = count + 1
        return prefix if count == 0 else f"{prefix}_{count}"

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> str:
        """Declares `value` as the graph output `name` (through an Identity when they differ)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name], name=f"{name}_out"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def rename(self, value: str, name: str) -> str:
        """Gives the node output `value` the name `name`, so it can be a graph output as it is."""
        for node in self.nodes:
            node.output[:] = [name if out == value else out for out in node.output]
            node.input[:] = [name if out == value else out for out in node.input]
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small constant, shared between the nodes that use the same value."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.weight(self.fresh("const"), array)
        return self._constants[key]

    def op(self, op_type: str, inputs: list, name: str, outputs: int = 1, **attributes):
        """Adds one node; returns its output name (or names when `outputs` > 1)."""
        node_name = self.fresh(name)
        names = [node_name] if outputs == 1 else [f"{node_name}:{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=node_name, **attributes))
        return names[0] if outputs == 1 else names

    def model(self, graph_name: str, producer: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs,
                                  initializer=self.initializers)
        domains = [helper.make_opsetid("", OPSET)]
        # onnxruntime's contrib operators (GroupQueryAttention), where a graph uses them.
        if any(node.domain == "com.microsoft" for node in self.nodes):
            domains.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=domains, producer_name=producer)
        model.ir_version = 8
        return model


def save(model: onnx.ModelProto, path: str, external_data: bool) -> None:
    """Checks and writes the model; large weights go to `<file>_data` beside it, as optimum does."""
    if external_data:
        import os
        location = os.path.basename(path) + "_data"
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
    else:
        onnx.save_model(model, path)
    onnx.checker.check_model(path, full_check=False)


INT32 = TensorProto.INT32
INT64 = TensorProto.INT64
FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
