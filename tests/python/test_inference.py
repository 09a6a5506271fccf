"""A Python grpcio client against the real server: Embed, Classify (of texts and of text pairs),
Tokenize, health, reflection."""

import json
import math
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tokenizers import Tokenizer

from lmserve.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc

REPOSITORY = Path(__file__).resolve().parents[2] / "models" / "repository"


def reference(model):
    return json.loads((REPOSITORY / model / "1" / "reference.json").read_text())


def test_embed_matches_reference(channel):
    stub = inference_pb2_grpc.InferenceStub(channel)
    cases = reference("tiny-encoder")["embed"]["cases"]
    response = stub.Embed(inference_pb2.EmbedRequest(model="tiny-encoder", texts=[c["text"] for c in cases]))
    assert response.served_by.model == "tiny-encoder"
    assert len(response.embeddings) == len(cases)
    for case, embedding in zip(cases, response.embeddings):
        diff = max(abs(a - b) for a, b in zip(embedding.values, case["embedding"]))
        assert diff <= 1e-4, (case["text"], diff)
        assert math.isclose(math.sqrt(sum(v * v for v in embedding.values)), 1.0, abs_tol=1e-4)


def test_embed_dimensions_keep_the_leading_values(channel):
    """As sentence-transformers' encode(truncate_dim=...): the normalized vector's first values;
    with normalize=True, normalized again after the cut."""
    stub = inference_pb2_grpc.InferenceStub(channel)
    text = "Shall I compare thee to a summer's day?"
    full = stub.Embed(inference_pb2.EmbedRequest(model="tiny-encoder", texts=[text])).embeddings[0].values
    cut = stub.Embed(inference_pb2.EmbedRequest(model="tiny-encoder", texts=[text], dimensions=8)).embeddings[0].values
    assert len(cut) == 8 and max(abs(a - b) for a, b in zip(cut, full[:8])) <= 1e-6
    again = stub.Embed(
        inference_pb2.EmbedRequest(model="tiny-encoder", texts=[text], dimensions=8, normalize=True)
    ).embeddings[0].values
    norm = math.sqrt(sum(v * v for v in full[:8]))
    assert max(abs(a - b / norm) for a, b in zip(again, full[:8])) <= 1e-5
    with pytest.raises(grpc.RpcError) as refused:
        stub.Embed(inference_pb2.EmbedRequest(model="tiny-encoder", texts=[text], dimensions=len(full) + 1))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dimensions" in refused.value.details() and str(len(full) + 1) in refused.value.details()


def test_classify_matches_reference(channel):
    stub = inference_pb2_grpc.InferenceStub(channel)
    ref = reference("tiny-encoder")["classify"]
    response = stub.Classify(inference_pb2.ClassifyRequest(model="tiny-encoder", texts=[c["text"] for c in ref["cases"]]))
    assert len(response.classifications) == len(ref["cases"])
    for case, classification in zip(ref["cases"], response.classifications):
        assert len(classification.labels) == len(ref["labels"])
        for label in classification.labels:
            assert label.label == ref["labels"][label.index]
            assert abs(label.score - case["probabilities"][label.index]) <= 1e-4


def test_classify_text_pairs_as_the_tokenizer_pairs_them(channel):
    """A reranker's scores: onnxruntime's on the tokenizer's own pair encoding (the pair's tokens
    of type 1), and transformers' pipeline's on {"text", "text_pair"} (reference.json)."""
    folder = REPOSITORY / "tiny-reranker" / "1"
    ref = reference("tiny-reranker")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    stub = inference_pb2_grpc.InferenceStub(channel)
    cases = ref["cases"]
    response = stub.Classify(inference_pb2.ClassifyRequest(
        model="tiny-reranker", texts=[c["text"] for c in cases], text_pairs=[c["text_pair"] for c in cases]))
    for case, classification in zip(cases, response.classifications, strict=True):
        encoding = tokenizer.encode(case["text"], case["text_pair"])
        assert 1 in encoding.type_ids
        feeds = {"input_ids": [encoding.ids], "attention_mask": [encoding.attention_mask],
                 "token_type_ids": [encoding.type_ids]}
        logits = session.run(["logits"], {k: np.array(v, np.int64) for k, v in feeds.items()})[0][0]
        # One relevance logit, which transformers' pipeline scores with a sigmoid.
        assert logits.shape == (1,)
        expected = 1 / (1 + np.exp(-logits))
        served = np.zeros(len(ref["labels"]))
        for label in classification.labels:
            assert label.label == ref["labels"][label.index]
            served[label.index] = label.score
        assert np.abs(served - expected).max() <= 1e-5, (case, served, expected)
        assert np.abs(served - np.array(case["probabilities"])).max() <= 1e-4, (case, served)
        assert classification.token_count == len(encoding.ids)

        # The token types matter: without them the graph scores the pair otherwise.
        feeds["token_type_ids"] = [[0] * len(encoding.ids)]
        untyped = session.run(["logits"], {k: np.array(v, np.int64) for k, v in feeds.items()})[0][0]
        assert abs(1 / (1 + np.exp(-untyped[0])) - expected[0]) > 1e-3

    # Over the model's 128 tokens, both texts are cut, the longer first, from the side asked for:
    # as the tokenizer cuts them with longest_first truncation to the same length.
    text = " ".join(["king queen crown throne sword"] * 20)
    pair = " ".join(["Now is the winter of our discontent"] * 12)
    for side, truncate in (("right", inference_pb2.TRUNCATE_RIGHT), ("left", inference_pb2.TRUNCATE_LEFT)):
        tokenizer.enable_truncation(128, strategy="longest_first", direction=side)
        encoding = tokenizer.encode(text, pair)
        tokenizer.no_truncation()
        feeds = {"input_ids": [encoding.ids], "attention_mask": [encoding.attention_mask],
                 "token_type_ids": [encoding.type_ids]}
        logits = session.run(["logits"], {k: np.array(v, np.int64) for k, v in feeds.items()})[0][0]
        served = stub.Classify(inference_pb2.ClassifyRequest(
            model="tiny-reranker", texts=[text], text_pairs=[pair], truncate=truncate)).classifications[0]
        assert served.truncated and served.token_count == len(encoding.ids) == 128
        assert abs(served.labels[0].score - 1 / (1 + np.exp(-logits[0]))) <= 1e-5, side

    with pytest.raises(grpc.RpcError) as error:
        stub.Classify(inference_pb2.ClassifyRequest(model="tiny-reranker", texts=["a", "b"], text_pairs=["c"]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "text_pairs" in error.value.details() and "2 texts" in error.value.details()


def test_tokenize_round_trip(channel):
    stub = inference_pb2_grpc.InferenceStub(channel)
    text = "What light through yonder window breaks?"
    tokens = stub.Tokenize(inference_pb2.TokenizeRequest(model="tiny-gpt2", text=text)).tokens
    assert "".join(text[t.start:t.end] for t in tokens) == text
    decoded = stub.Detokenize(inference_pb2.DetokenizeRequest(model="tiny-gpt2", ids=[t.id for t in tokens]))
    assert decoded.text == text


def test_tokenize_shows_a_text_pair_as_the_tokenizer_pairs_it(channel):
    """A cross-encoder's input as the model reads it: the tokenizers library's own encoding of
    the pair, its type ids, and which tokens (and offsets) belong to the pair."""
    stub = inference_pb2_grpc.InferenceStub(channel)
    tokenizer = Tokenizer.from_file(str(REPOSITORY / "tiny-reranker" / "1" / "tokenizer.json"))
    text, pair = "parting sorrow", "Good night, good night! parting is such sweet sorrow,"
    encoding = tokenizer.encode(text, pair)
    tokens = stub.Tokenize(inference_pb2.TokenizeRequest(model="tiny-reranker", text=text, text_pair=pair)).tokens
    assert [t.id for t in tokens] == encoding.ids
    assert [t.type_id for t in tokens] == encoding.type_ids and 1 in encoding.type_ids
    assert [t.in_pair for t in tokens] == [sequence == 1 for sequence in encoding.sequence_ids]
    # Offsets count the characters of the text each token comes from.
    assert [(t.start, t.end) for t in tokens] == encoding.offsets
    assert [pair[t.start:t.end] for t in tokens if t.in_pair][:3] == ["Good", "night", ","]

    # A conversation has no pair.
    messages = inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(role="user", content="hi")])
    with pytest.raises(grpc.RpcError) as error:
        stub.Tokenize(inference_pb2.TokenizeRequest(model="tiny-llama", messages=messages, text_pair="x"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "text_pair" in error.value.details()


def test_errors_carry_codes(channel):
    stub = inference_pb2_grpc.InferenceStub(channel)
    with pytest.raises(grpc.RpcError) as missing:
        stub.Embed(inference_pb2.EmbedRequest(model="no-such-model", texts=["x"]))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as bad_top_k:
        stub.Classify(inference_pb2.ClassifyRequest(model="tiny-encoder", texts=["x"], top_k=0))
    assert bad_top_k.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_k" in bad_top_k.value.details()


def test_health_and_models(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "lmserve.v1.Inference", "lmserve.v1.Models"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    models = models_pb2_grpc.ModelsStub(channel).ListModels(models_pb2.ListModelsRequest())
    assert "tiny-encoder" in [m.name for m in models.models]


def test_reflection_v1alpha_lists_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = [s.name for s in next(responses).list_services_response.service]
    assert "lmserve.v1.Inference" in names
