"""Triton's own Python client, tritonclient[grpc] from PyPI and unmodified, against lmserve's KServe
v2 service: health, metadata, ModelInfer for generate, embed and classify (compared with what
lmserve.v1 answers), token streaming with ModelStreamInfer, errors; and lmserve's proto checked
field by field against the descriptor tritonclient ships."""

import json
import queue
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2
from grpc_tools import protoc
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from lmserve.v1 import inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "ROMEO:"
TEXTS = ["free money, click now", "see you at lunch tomorrow", "ROMEO:"]


@pytest.fixture()
def client(server_address):
    with triton.InferenceServerClient(server_address) as client:
        yield client


def text_input_named(name, texts):
    tensor = triton.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    return tensor


def text_input(texts):
    return text_input_named("text_input", texts)


def flag(name, value):
    tensor = triton.InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value], dtype=bool))
    return tensor


def lmserve_generate(channel, max_new_tokens):
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = inference_pb2.GenerateRequest(
        model="tiny-gpt2", text=PROMPT,
        parameters=inference_pb2.GenerationParameters(max_new_tokens=max_new_tokens))
    return stub.Generate(request).sequences[0].text


def _messages(file_proto):
    """Every message of a file, nested ones included, by full name."""
    found = {}

    def walk(messages, prefix):
        for message in messages:
            found[prefix + message.name] = message
            walk(message.nested_type, prefix + message.name + ".")

    walk(file_proto.message_type, "")
    return found


def _fields(message):
    return [(f.name, f.number, f.label, f.type, f.type_name,
             message.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None)
            for f in message.field], message.options.map_entry


def test_proto_matches_tritonclients_field_for_field():
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "kserve.pb"
        status = protoc.main(["grpc_tools.protoc", f"-I{ROOT / 'proto'}",
                              f"--descriptor_set_out={out}", "inference/grpc_service.proto"])
        assert status == 0
        ours = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    theirs = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(theirs)
    assert ours.package == theirs.package == "inference"
    their_messages = _messages(theirs)
    for name, message in _messages(ours).items():
        assert _fields(message) == _fields(their_messages[name]), name
    their_methods = {m.name: m for m in theirs.service[0].method}
    assert ours.service[0].name == theirs.service[0].name
    for method in ours.service[0].method:
        their = their_methods[method.name]
        assert (method.input_type, method.output_type, method.client_streaming,
                method.server_streaming) == (their.input_type, their.output_type,
                                             their.client_streaming, their.server_streaming)


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny-gpt2")
    assert client.is_model_ready("tiny-encoder", "1")
    assert not client.is_model_ready("no-such-model")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "lmserve"
    metadata = client.get_model_metadata("tiny-encoder", as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
        ("embedding", "FP32", ["-1", "128"]),
        ("probabilities", "FP32", ["-1", "2"]),
        ("labels", "BYTES", ["2"]),
    ]
    metadata = client.get_model_metadata("tiny-gpt2")
    assert [t.name for t in metadata.inputs] == ["text_input", "stream", "exclude_input_in_output"]
    assert [t.name for t in metadata.outputs] == ["text_output"]


def test_infer_generate_matches_lmserve_generate(client, channel):
    expected = lmserve_generate(channel, 16)
    # As Triton's vLLM backend answers: the prompt, then the generated text. tritonclient's own
    # options (priority, timeout in microseconds) are taken.
    result = client.infer("tiny-gpt2", [text_input([PROMPT])], parameters={"max_tokens": 16},
                          outputs=[triton.InferRequestedOutput("text_output")], request_id="g1",
                          priority=1, timeout=30_000_000)
    assert result.as_numpy("text_output").tolist() == [(PROMPT + expected).encode()]
    response = result.get_response()
    assert response.id == "g1"
    assert response.parameters["served_by"].string_param == "tiny-gpt2@1"
    excluded = client.infer("tiny-gpt2", [text_input([PROMPT]), flag("exclude_input_in_output", True)],
                            parameters={"max_tokens": 16})
    assert excluded.as_numpy("text_output").tolist() == [expected.encode()]


def test_infer_embed_and_classify_match_lmserve(client, channel):
    stub = inference_pb2_grpc.InferenceStub(channel)
    embedded = stub.Embed(inference_pb2.EmbedRequest(model="tiny-encoder", texts=TEXTS))
    classified = stub.Classify(inference_pb2.ClassifyRequest(model="tiny-encoder", texts=TEXTS))
    result = client.infer("tiny-encoder", [text_input(TEXTS)])
    embeddings = result.as_numpy("embedding").reshape(len(TEXTS), -1)
    expected = np.array([e.values for e in embedded.embeddings], dtype=np.float32)
    assert np.abs(embeddings - expected).max() <= 1e-5
    labels = [label.decode() for label in result.as_numpy("labels")]
    assert labels == ["ham", "spam"]
    probabilities = result.as_numpy("probabilities").reshape(len(TEXTS), len(labels))
    for row, classification in enumerate(classified.classifications):
        for label in classification.labels:
            assert labels[label.index] == label.label
            assert abs(probabilities[row, label.index] - label.score) <= 1e-5

    reference = json.loads((ROOT / "models/repository/tiny-encoder/1/reference.json").read_text())
    cases = reference["embed"]["cases"]
    only = client.infer("tiny-encoder", [text_input([c["text"] for c in cases])],
                        outputs=[triton.InferRequestedOutput("embedding")])
    assert [o.name for o in only.get_response().outputs] == ["embedding"]
    got = only.as_numpy("embedding").reshape(len(cases), -1)
    assert np.abs(got - np.array([c["embedding"] for c in cases])).max() <= 1e-4


def test_infer_classifies_text_pairs_as_lmserve_does(client, channel):
    reference = json.loads((ROOT / "models/repository/tiny-reranker/1/reference.json").read_text())
    texts = [c["text"] for c in reference["cases"]]
    pairs = [c["text_pair"] for c in reference["cases"]]
    metadata = client.get_model_metadata("tiny-reranker")
    assert [(t.name, t.datatype) for t in metadata.inputs] == [("text_input", "BYTES"), ("text_pair", "BYTES")]
    stub = inference_pb2_grpc.InferenceStub(channel)
    classified = stub.Classify(inference_pb2.ClassifyRequest(model="tiny-reranker", texts=texts, text_pairs=pairs))
    result = client.infer("tiny-reranker", [text_input(texts), text_input_named("text_pair", pairs)])
    probabilities = result.as_numpy("probabilities").reshape(len(texts), -1)
    for row, classification in enumerate(classified.classifications):
        for label in classification.labels:
            assert abs(probabilities[row, label.index] - label.score) <= 1e-5
    assert np.abs(probabilities - np.array([c["probabilities"] for c in reference["cases"]])).max() <= 1e-4

    # One pair per text, and no embedding of a pair.
    with pytest.raises(InferenceServerException, match=r"text_pair.shape.*\(8 rows\); got 1"):
        client.infer("tiny-reranker", [text_input(texts), text_input_named("text_pair", pairs[:1])])
    with pytest.raises(InferenceServerException, match="text_pair: is read for classification only"):
        client.infer("tiny-encoder", [text_input(texts[:1]), text_input_named("text_pair", pairs[:1])],
                     outputs=[triton.InferRequestedOutput("embedding")])


def test_stream_infer_streams_token_deltas_then_a_final_response(client, channel):
    expected = lmserve_generate(channel, 20)
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("tiny-gpt2", [text_input([PROMPT]), flag("stream", True)],
                                  request_id="s1", parameters={"max_tokens": 20},
                                  enable_empty_final_response=True)
        deltas = []
        while True:
            result, error = responses.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            assert response.id == "s1"
            deltas.append(result.as_numpy("text_output")[0].decode())
            if response.parameters["triton_final_response"].bool_param:
                generated = response.parameters["generated_tokens"].int64_param
                break
        assert "".join(deltas) == expected
        assert len(deltas) == generated + 1

        # Without `stream` true, one response with the whole text, as Triton's vLLM backend.
        client.async_stream_infer("tiny-gpt2", [text_input([PROMPT])], request_id="w1",
                                  parameters={"max_tokens": 20})
        result, error = responses.get(timeout=60)
        assert error is None
        assert result.get_response().parameters["triton_final_response"].bool_param
        assert result.as_numpy("text_output").tolist() == [(PROMPT + expected).encode()]

        # A failing request answers through the callback; the stream goes on.
        client.async_stream_infer("tiny-gpt2", [text_input([PROMPT])], request_id="bad",
                                  parameters={"top_k": "five"})
        result, error = responses.get(timeout=60)
        assert result is None
        assert "parameters.top_k" in error.message()
        client.async_stream_infer("tiny-encoder", [text_input(["hello"])], request_id="e1")
        result, error = responses.get(timeout=60)
        assert error is None and result.get_response().id == "e1"
        assert result.get_response().parameters["triton_final_response"].bool_param
    finally:
        client.stop_stream()


def test_errors_name_the_field(client):
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("tiny-gpt2", [text_input([PROMPT])], parameters={"temprature": 0.5})
    assert unknown.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert unknown.value.message().startswith("parameters.temprature:")
    with pytest.raises(InferenceServerException) as batch:
        client.infer("tiny-gpt2", [text_input(["a", "b"])])
    assert batch.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert batch.value.message().startswith("text_input.shape:")
    with pytest.raises(InferenceServerException) as missing:
        client.infer("no-such-model", [text_input(["a"])])
    assert missing.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as config:
        client.get_model_config("tiny-gpt2")
    assert config.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "ModelInfer" in config.value.message()
    assert client.is_server_ready()
