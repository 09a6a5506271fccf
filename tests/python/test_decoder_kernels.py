"""The kernels onnxruntime runs for a decoder that models/real/llama.py writes in place.

That converter writes its norms in the form onnxruntime's SimplifiedLayerNormFusion matches and
merges the residual Add into each norm, and packs the query, key and value (and the gate and up)
products into one each; an in-process SmolLM2 decode step took a tenth less time for it. Only
onnxruntime's optimizer makes the norms one kernel, so a change on either side that undoes that
would show only as a slower benchmark; this test says so at once, on the committed tiny-llama
fixture.
"""
from collections import Counter

import onnx
import onnxruntime
import pytest

from conftest import ROOT

IN_PLACE = ROOT / "tests" / "fixtures" / "in-place" / "tiny-llama-in-place" / "1" / "model.onnx"


@pytest.fixture(scope="module")
def optimized_kernels(tmp_path_factory) -> Counter:
    """The operator counts of the graph onnxruntime runs on the CPU after its own fusions."""
    optimized = tmp_path_factory.mktemp("optimized") / "model.onnx"
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    onnxruntime.InferenceSession(str(IN_PLACE), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)


def test_each_norm_is_one_kernel_with_its_residual_add(optimized_kernels):
    layers = optimized_kernels["GroupQueryAttention"]
    assert layers >= 2, optimized_kernels
    # The first norm has no residual before it; every later one (2 a layer, and the final norm
    # but for the first) takes the Add in.
    assert optimized_kernels["SimplifiedLayerNormalization"] == 1, optimized_kernels
    assert optimized_kernels["SkipSimplifiedLayerNormalization"] == 2 * layers, optimized_kernels
    for unfused in ("ReduceMean", "Sqrt", "Div", "Pow"):
        assert optimized_kernels[unfused] == 0, (unfused, optimized_kernels)


def test_a_layer_runs_four_products(optimized_kernels):
    layers = optimized_kernels["GroupQueryAttention"]
    # Packed query, key and value; the attention's output; packed gate and up; down.
    assert optimized_kernels["MatMul"] == 4 * layers, optimized_kernels
