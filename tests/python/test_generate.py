"""A Python grpcio client consuming GenerateStream, checked against the committed references."""

import json
from pathlib import Path

from lmserve.v1 import inference_pb2, inference_pb2_grpc

REPOSITORY = Path(__file__).resolve().parents[2] / "models" / "repository"


def test_generate_stream_matches_reference_and_unary(channel):
    stub = inference_pb2_grpc.InferenceStub(channel)
    generate = json.loads((REPOSITORY / "tiny-gpt2" / "1" / "reference.json").read_text())["generate"]
    case = generate["cases"][0]
    params = inference_pb2.GenerationParameters(max_new_tokens=generate["max_new_tokens"], ignore_eos=True)
    request = inference_pb2.GenerateRequest(model="tiny-gpt2", text=case["prompt"], parameters=params)

    messages = list(stub.GenerateStream(request))
    ids = [m.token.id for m in messages if m.HasField("token")]
    assert ids == case["greedy_ids"]
    assert messages[0].served_by.model == "tiny-gpt2"
    assert messages[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH

    unary = stub.Generate(request)
    assert "".join(m.text for m in messages) == unary.sequences[0].text
    assert [t.id for t in unary.sequences[0].tokens] == ids


def test_cancelling_a_stream_midway(channel):
    stub = inference_pb2_grpc.InferenceStub(channel)
    params = inference_pb2.GenerationParameters(max_new_tokens=200, ignore_eos=True)
    call = stub.GenerateStream(inference_pb2.GenerateRequest(model="tiny-lstm", text="ROMEO.", parameters=params))
    first = next(call)
    assert first.HasField("token")
    call.cancel()
    # The server keeps serving.
    again = stub.Generate(inference_pb2.GenerateRequest(
        model="tiny-lstm", text="ROMEO.", parameters=inference_pb2.GenerationParameters(max_new_tokens=4, ignore_eos=True)))
    assert len(again.sequences[0].tokens) == 4
