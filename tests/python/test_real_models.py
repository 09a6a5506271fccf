"""The real pretrained models of `make real-models`, served end to end and compared with
references computed without lmserve:

- all-MiniLM-L6-v2: sentence-transformers' own embeddings (its tokenizer with [CLS]/[SEP], mean
  pooling over the attention mask, L2 norm, 256-token limit) of held-out Tatoeba sentences,
  and those vectors cut by its `truncate_dim`, committed in models/real/reference/ by
  models/real/reference.py.
- SmolLM2-135M-Instruct: a plain onnxruntime greedy loop, written here with the tokenizers
  library, over the same weights in optimum's layout (the served graph writes its cache in
  place, which a plain loop cannot feed); and transformers' greedy tokens from the package's
  GGUF file (committed), which the converted graph must reproduce.
"""
import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from tokenizers import Tokenizer

from conftest import ROOT, real_models, serve
from lmserve.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc

import grpc

REFERENCES = ROOT / "models" / "real" / "reference"
MINILM = "all-minilm-l6-v2"
SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def real_channel(real_server_address):
    with grpc.insecure_channel(real_server_address,
                               options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        yield channel


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_minilm_embeddings_match_sentence_transformers(real_channel):
    reference = json.loads((REFERENCES / f"{MINILM}.json").read_text())
    cases = reference["cases"]
    assert len([c for c in cases if not c["truncated"]]) >= 50
    stub = inference_pb2_grpc.InferenceStub(real_channel)
    # All in one request (sentence-transformers truncates at 256 tokens; so must the request).
    response = stub.Embed(inference_pb2.EmbedRequest(
        model=MINILM, texts=[c["text"] for c in cases], truncate=inference_pb2.TRUNCATE_RIGHT))
    cosines = []
    for case, embedding in zip(cases, response.embeddings):
        cosines.append(cosine(embedding.values, case["embedding"]))
        assert embedding.token_count == case["tokens"], case["text"][:60]
        assert embedding.truncated == case["truncated"]
        assert abs(math.sqrt(sum(v * v for v in embedding.values)) - 1) < 1e-5, "Normalize module"
    print(f"\nall-MiniLM-L6-v2 vs sentence-transformers over {len(cases)} texts: "
          f"min cosine {min(cosines):.8f}, mean {np.mean(cosines):.8f}")
    assert min(cosines) >= 0.99999

    # One at a time, the same vectors: batching and padding change nothing.
    for case in cases[:8]:
        alone = stub.Embed(inference_pb2.EmbedRequest(model=MINILM, texts=[case["text"]]))
        assert cosine(alone.embeddings[0].values, case["embedding"]) >= 0.99999

    # Over the limit without truncation: refused, naming the count and the limit.
    long_text = next(c["text"] for c in cases if c["truncated"])
    with pytest.raises(grpc.RpcError) as refused:
        stub.Embed(inference_pb2.EmbedRequest(model=MINILM, texts=[long_text]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "maximum of 256" in refused.value.details()


def test_minilm_settings_come_from_its_sentence_transformers_files(real_channel):
    models = models_pb2_grpc.ModelsStub(real_channel)
    version = models.GetModel(models_pb2.GetModelRequest(name=MINILM)).versions[0]
    settings = {s.name: (s.value, s.source) for s in version.settings}
    assert settings["max_length"] == ("256", "sentence_bert_config.json")
    assert settings["embed.pooling"] == ("mean", "1_Pooling/config.json")
    assert settings["embed.normalize"] == ("true", "modules.json")
    assert settings["add_special_tokens"][1] == "tokenizer.json"
    stub = inference_pb2_grpc.InferenceStub(real_channel)
    tokens = stub.Tokenize(inference_pb2.TokenizeRequest(model=MINILM, text="Hello there")).tokens
    assert [t.text for t in tokens] == ["[CLS]", "hello", "there", "[SEP]"]


@pytest.fixture(scope="module")
def prompted_minilm(tmp_path_factory):
    """all-MiniLM-L6-v2 with prompts in its sentence-transformers config, which the real one
    lacks: each prompt is the start of a reference text, so a prompt and the rest of that text
    must give sentence-transformers' own vector of the whole (encode(prompt_name=...) embeds
    the prompt and the text as one string)."""
    reference = json.loads((REFERENCES / f"{MINILM}.json").read_text())
    case = next(c for c in reference["cases"] if not c["truncated"] and c["text"].count(" ") >= 3)
    head, rest = case["text"].split(" ", 1)
    repository = tmp_path_factory.mktemp("prompted")
    source = real_models() / MINILM / "1"
    for name in ("minilm-prompted", "minilm-instructed"):
        version = repository / name / "1"
        # Copies: the server refuses files that lead out of the repository.
        shutil.copytree(source, version)
        config = json.loads((source / "config_sentence_transformers.json").read_text())
        config.update(prompts={"head": head + " ", "other": "query: "}, default_prompt_name="head")
        (version / "config_sentence_transformers.json").write_text(json.dumps(config))
    # INSTRUCTOR-style: the prompt's tokens are left out of pooling.
    pooling = repository / "minilm-instructed" / "1" / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps(dict(json.loads(pooling.read_text()), include_prompt=False)))
    for address in serve(["--repository", str(repository)]):
        with grpc.insecure_channel(address) as channel:
            yield channel, case, rest


def test_a_sentence_transformers_prompt_goes_before_the_text(prompted_minilm):
    channel, case, rest = prompted_minilm
    stub = inference_pb2_grpc.InferenceStub(channel)

    def embed(**fields):
        return stub.Embed(inference_pb2.EmbedRequest(model="minilm-prompted", texts=[rest], **fields)).embeddings[0]

    named = embed(prompt_name="head")
    assert cosine(named.values, case["embedding"]) >= 0.99999
    assert named.token_count == case["tokens"]
    # The model's default_prompt_name, when the request names none.
    assert cosine(embed().values, case["embedding"]) >= 0.99999
    # An empty name: no prompt, so another vector with fewer tokens.
    bare = embed(prompt_name="")
    assert cosine(bare.values, case["embedding"]) < 0.999 and bare.token_count < case["tokens"]
    with pytest.raises(grpc.RpcError) as refused:
        embed(prompt_name="passage")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_name" in refused.value.details() and "`head`, `other`" in refused.value.details()
    # Keeping the tail would cut the prompt off first.
    with pytest.raises(grpc.RpcError) as refused:
        embed(truncate=inference_pb2.TRUNCATE_LEFT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncate" in refused.value.details(), refused.value.details()
    assert embed(prompt_name="", truncate=inference_pb2.TRUNCATE_LEFT).token_count == bare.token_count
    models = models_pb2_grpc.ModelsStub(channel)
    version = models.GetModel(models_pb2.GetModelRequest(name="minilm-prompted")).versions[0]
    settings = {s.name: (s.value, s.source) for s in version.settings}
    assert settings["embed.default_prompt_name"] == ("head", "config_sentence_transformers.json")
    assert "query: " in settings["embed.prompts"][0]


@pytest.fixture(scope="module")
def truncated_minilm(tmp_path_factory):
    """all-MiniLM-L6-v2 whose sentence-transformers config sets `truncate_dim`, as the reference
    script's copy does."""
    reference = json.loads((REFERENCES / f"{MINILM}-truncate-dim.json").read_text())
    repository = tmp_path_factory.mktemp("truncated")
    version = repository / "minilm-truncated" / "1"
    shutil.copytree(real_models() / MINILM / "1", version)
    config_path = version / "config_sentence_transformers.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, truncate_dim=reference["truncate_dim"])))
    for address in serve(["--repository", str(repository)]):
        with grpc.insecure_channel(address) as channel:
            yield channel, reference


def test_minilm_vectors_cut_as_sentence_transformers_truncate_dim_cuts_them(
        real_channel, truncated_minilm):
    truncated_channel, reference = truncated_minilm
    texts = [case["text"] for case in reference["cases"]]
    width = reference["truncate_dim"]

    def embed(channel, model, **fields):
        stub = inference_pb2_grpc.InferenceStub(channel)
        response = stub.Embed(inference_pb2.EmbedRequest(model=model, texts=texts, **fields))
        return [list(e.values) for e in response.embeddings]

    served = {
        # encode(truncate_dim=96): the Normalize module's unit vector, then the cut.
        "truncate_dim": embed(real_channel, MINILM, dimensions=width),
        # encode(truncate_dim=96, normalize_embeddings=True): normalized again after the cut.
        "truncate_dim_normalized": embed(real_channel, MINILM, dimensions=width, normalize=True),
        # The model's own config_sentence_transformers.json `truncate_dim`, no request field.
        "config_truncate_dim": embed(truncated_channel, "minilm-truncated"),
    }
    for way, vectors in served.items():
        for case, vector in zip(reference["cases"], vectors):
            expected = np.asarray(case[way])
            assert len(vector) == width, way
            # Values, not only directions: the length after the cut is part of the definition.
            assert np.abs(np.asarray(vector) - expected).max() < 1e-5, (way, case["text"])
    lengths = [np.linalg.norm(v) for v in served["truncate_dim"]]
    assert max(lengths) < 0.9, "a cut unit vector is shorter than 1"


class OnnxLoop:
    """Greedy decoding with onnxruntime alone: the whole prompt, then one token a step with the
    KV cache fed back, until the model's EOS (from its generation_config.json) or the limit."""

    def __init__(self, folder: Path):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = onnxruntime.InferenceSession(str(folder / "model.onnx"), options,
                                                    providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
        self.pasts = [i.name for i in self.session.get_inputs() if i.name.startswith("past_")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        shape = self.session.get_inputs()[3].shape
        self.empty = np.zeros((1, shape[1], 0, shape[3]), np.float32)

    def greedy(self, prompt: str, max_new_tokens: int) -> list:
        ids = self.tokenizer.encode(prompt).ids
        past = {name: self.empty for name in self.pasts}
        fed, tokens, new = 0, [], ids
        for _ in range(max_new_tokens):
            feed = {"input_ids": np.array([new], np.int64),
                    "attention_mask": np.ones((1, fed + len(new)), np.int64),
                    "position_ids": np.arange(fed, fed + len(new), dtype=np.int64)[None], **past}
            result = dict(zip(self.outputs, self.session.run(None, feed)))
            token = int(result["logits"][0, -1].argmax())
            fed += len(new)
            past = {name: result[name.replace("past_key_values", "present")] for name in self.pasts}
            tokens.append(token)
            new = [token]
            if token == self.eos:
                break
        return tokens


@pytest.fixture(scope="module")
def smollm2_cases():
    reference = json.loads((REFERENCES / f"{SMOLLM2}.json").read_text())
    loop = OnnxLoop(real_models().parent / "optimum" / SMOLLM2 / "1")
    limit = reference["max_new_tokens"]
    cases = [(case["prompt"], loop.greedy(case["prompt"], limit), case["tokens"])
             for case in reference["cases"]]
    return limit, cases


def test_smollm2_converted_graph_reproduces_transformers(smollm2_cases):
    _, cases = smollm2_cases
    for prompt, loop_tokens, transformers_tokens in cases:
        assert loop_tokens == transformers_tokens, prompt


def greedy_request(prompt: str, limit: int):
    return inference_pb2.GenerateRequest(
        model=SMOLLM2, text=prompt,
        parameters=inference_pb2.GenerationParameters(max_new_tokens=limit, do_sample=False))


def test_smollm2_greedy_matches_the_onnxruntime_loop_alone_and_batched(real_channel, smollm2_cases):
    limit, cases = smollm2_cases
    assert len(cases) >= 5
    stub = inference_pb2_grpc.InferenceStub(real_channel)
    for prompt, expected, _ in cases:
        response = stub.Generate(greedy_request(prompt, limit))
        assert [t.id for t in response.sequences[0].tokens] == expected, prompt

    # All at once, streamed: the scheduler decodes them in one batch.
    def stream(prompt):
        return [m.token.id for m in stub.GenerateStream(greedy_request(prompt, limit))
                if m.HasField("token")]
    with ThreadPoolExecutor(len(cases)) as pool:
        streamed = list(pool.map(stream, [prompt for prompt, _, _ in cases]))
    for (prompt, expected, _), got in zip(cases, streamed):
        assert got == expected, prompt


def test_smollm2_stops_at_the_eos_of_generation_config(real_channel, smollm2_cases):
    limit, cases = smollm2_cases
    stub = inference_pb2_grpc.InferenceStub(real_channel)
    eos = json.loads((real_models() / SMOLLM2 / "1" / "generation_config.json").read_text())
    chat = [(prompt, expected) for prompt, expected, _ in cases
            if expected[-1] == eos["eos_token_id"] and len(expected) < limit]
    assert chat, "a reference prompt ends at EOS"
    for prompt, expected in chat:
        sequence = stub.Generate(greedy_request(prompt, limit)).sequences[0]
        assert sequence.finish_reason == inference_pb2.FINISH_REASON_EOS
        assert len(sequence.tokens) == len(expected)
        assert "<|im_end|>" not in sequence.text
    models = models_pb2_grpc.ModelsStub(real_channel)
    settings = {s.name: (s.value, s.source)
                for s in models.GetModel(models_pb2.GetModelRequest(name=SMOLLM2)).versions[0].settings}
    assert settings["eos_token_ids"] == ("[2]", "generation_config.json")
    assert settings["max_length"][0] == "8192"
    assert settings["chat_template"][1] == "tokenizer_config.json"


def test_a_model_that_pools_without_its_prompt_leaves_the_prompt_s_tokens_out(prompted_minilm):
    """sentence-transformers' Pooling with include_prompt false zeroes the attention mask over
    the prompt's tokens (the prompt tokenized alone, less its last special token) before mean
    pooling; the reference does the same over onnxruntime's token states of the whole text."""
    channel, case, rest = prompted_minilm
    folder = real_models() / MINILM / "1"
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    prompt = case["text"].split(" ", 1)[0] + " "
    ids = tokenizer.encode(prompt + rest).ids
    prompt_length = len(tokenizer.encode(prompt).ids) - 1
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
             "token_type_ids": np.zeros((1, len(ids)), np.int64)}
    states = session.run(None, feeds)[0][0]
    want = states[prompt_length:].mean(axis=0)
    want /= np.linalg.norm(want)

    stub = inference_pb2_grpc.InferenceStub(channel)
    got = stub.Embed(inference_pb2.EmbedRequest(model="minilm-instructed", texts=[rest])).embeddings[0]
    assert cosine(got.values, want) >= 0.99999
    assert got.token_count == len(ids)
    # With the prompt pooled it is another vector.
    assert cosine(got.values, case["embedding"]) < 0.9999
