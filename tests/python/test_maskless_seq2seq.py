"""Encoder-decoders that cannot be told which source columns are padding.

A plain export of a translation model may leave out the encoder's `attention_mask` input, the
decoder's `encoder_attention_mask` input, or both (nn.Transformer's `src_key_padding_mask` and
`memory_key_padding_mask` are optional). Batched with longer sources, such a model would read a
short source's padding, so the server must run sources of different lengths apart wherever the
graph cannot mask them.

The variants here are tiny-translator with its mask inputs replaced, inside the graph, by masks
of ones: the same weights with no way to mask. Each source alone is then exactly what the
original computes for it, so the committed references (made by nn.Transformer itself) must come
back token for token while every source is in flight at once.
"""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import serve
from lmserve.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc

TRANSLATOR = Path(__file__).resolve().parents[2] / "models" / "repository" / "tiny-translator" / "1"
REFERENCE = json.loads((TRANSLATOR / "reference.json").read_text())


def ones_in_place_of(model: onnx.ModelProto, mask: str, shape_nodes: list) -> None:
    """Drops the graph input `mask` and computes it as ones, of the shape `shape_nodes` make."""
    graph = model.graph
    declared = next(i for i in graph.input if i.name == mask)
    graph.input.remove(declared)
    one = helper.make_tensor("one", declared.type.tensor_type.elem_type, [1], [1])
    nodes = shape_nodes + [
        helper.make_node("ConstantOfShape", [f"{mask}_shape"], [mask], value=one),
    ]
    for node in reversed(nodes):
        graph.node.insert(0, node)


def without_encoder_mask(model: onnx.ModelProto) -> None:
    ones_in_place_of(model, "attention_mask", [
        helper.make_node("Shape", ["input_ids"], ["attention_mask_shape"]),
    ])


def without_source_mask(model: onnx.ModelProto) -> None:
    # [batch, src] from a cross-attention key, [batch, heads, src, dim].
    model.graph.initializer.append(
        helper.make_tensor("batch_and_source_axes", TensorProto.INT64, [2], [0, 2]))
    ones_in_place_of(model, "encoder_attention_mask", [
        helper.make_node("Shape", ["cross.0.key"], ["cross_shape"]),
        helper.make_node("Gather", ["cross_shape", "batch_and_source_axes"],
                         ["encoder_attention_mask_shape"], axis=0),
    ])


def rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    next(i for i in model.graph.input if i.name == old).name = new
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]


VARIANTS = {
    "encoder": (True, False),
    "decoder": (False, True),
    "both": (True, True),
}


@pytest.fixture(scope="module")
def maskless_server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("maskless")
    for name, (encoder_maskless, decoder_maskless) in VARIANTS.items():
        version = repository / f"maskless-{name}" / "1"
        shutil.copytree(TRANSLATOR, version)
        if encoder_maskless:
            encoder = onnx.load(str(version / "encoder.onnx"))
            without_encoder_mask(encoder)
            onnx.checker.check_model(encoder)
            onnx.save(encoder, str(version / "encoder.onnx"))
        if decoder_maskless:
            decoder = onnx.load(str(version / "decoder.onnx"))
            without_source_mask(decoder)
            onnx.checker.check_model(decoder)
            onnx.save(decoder, str(version / "decoder.onnx"))
            manifest = version / "model.toml"
            lines = manifest.read_text().splitlines()
            manifest.write_text("\n".join(l for l in lines if not l.startswith("encoder_attention_mask")) + "\n")
    # The encoder's inputs under other names, named in model.toml: masked as the original.
    version = repository / "renamed-source" / "1"
    shutil.copytree(TRANSLATOR, version)
    encoder = onnx.load(str(version / "encoder.onnx"))
    rename_input(encoder, "input_ids", "src")
    rename_input(encoder, "attention_mask", "src_key_padding_mask")
    onnx.save(encoder, str(version / "encoder.onnx"))
    manifest = version / "model.toml"
    manifest.write_text(manifest.read_text().replace(
        "[tensors]\n", '[tensors]\nsource_ids = "src"\nsource_mask = "src_key_padding_mask"\n'))
    # The same renamed graph without those lines: it must fail to load, saying what to set.
    version = repository / "unnamed-source" / "1"
    shutil.copytree(TRANSLATOR, version)
    onnx.save(encoder, str(version / "encoder.onnx"))
    yield from serve(["--repository", str(repository)])


def translate(stub, model: str, source: str, num_beams: int = 1):
    settings = REFERENCE["beam_settings"]
    parameters = inference_pb2.GenerationParameters(max_new_tokens=REFERENCE["max_new_tokens"], num_beams=num_beams)
    if num_beams > 1:
        parameters.length_penalty = settings["length_penalty"]
        parameters.early_stopping = (inference_pb2.EARLY_STOPPING_FIRST_BEAMS if settings["early_stopping"]
                                     else inference_pb2.EARLY_STOPPING_HEURISTIC)
    request = inference_pb2.GenerateRequest(model=model, text=source, parameters=parameters)
    return stub.Generate(request, timeout=60)


@pytest.mark.parametrize("model", [f"maskless-{variant}" for variant in VARIANTS] + ["renamed-source"])
def test_sources_of_every_length_in_flight_at_once_translate_as_alone(maskless_server, model):
    cases = [("greedy", 1, case) for case in REFERENCE["greedy"]]
    cases += [("beam", REFERENCE["beam_settings"]["num_beams"], case) for case in REFERENCE["beam"]]
    lengths = {len(case["source_ids"]) for _, _, case in cases}
    assert len(lengths) > 2, "the references must differ in source length to test this"
    with grpc.insecure_channel(maskless_server) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        # Twice over, so a source meets longer and shorter ones in the same prefill and steps.
        with ThreadPoolExecutor(max_workers=2 * len(cases)) as pool:
            calls = [(kind, case, pool.submit(translate, stub, model, case["source"], beams))
                     for kind, beams, case in cases * 2]
            for kind, case, call in calls:
                response = call.result()
                got = [token.id for token in response.sequences[0].tokens]
                assert got == case["ids"], f"{kind}: {case['source']}"
                assert response.sequences[0].text == case["text"]


def test_an_encoder_input_the_manifest_does_not_name_fails_its_load_naming_the_key(maskless_server):
    with grpc.insecure_channel(maskless_server) as channel:
        models = models_pb2_grpc.ModelsStub(channel)
        version = models.GetModel(models_pb2.GetModelRequest(name="unnamed-source")).versions[0]
    assert version.state == models_pb2.LOAD_STATE_FAILED
    assert '"src"' in version.load_error and "[tensors].source_ids" in version.load_error, version.load_error
