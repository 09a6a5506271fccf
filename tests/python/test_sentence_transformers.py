"""sentence-transformers' files beside an encoder, served as sentence-transformers (6.3) reads
them: each expected vector is computed here from onnxruntime's per-token states and the
`tokenizers` library, following sentence-transformers' own rules, independently of lmserve.

- Pooling with `include_prompt: false` masks the prompt's tokens: the prompt tokenized alone,
  less its last token only where that one is a special token (`Transformer._get_prompt_length`);
  CLS pooling then takes the first token left in the mask (`Pooling._forward_padded`).
- `do_lower_case` in the Transformer module's config puts a Lowercase normalizer ahead of the
  tokenizer's own; that config may carry an older name (`sentence_roberta_config.json`, ...).
- Normalize counts only as the pipeline's last module.
"""
import json
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
from tokenizers import Tokenizer, normalizers

from conftest import ROOT, serve
from lmserve.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc

import grpc

TINY = ROOT / "models" / "repository" / "tiny-encoder" / "1"
POOLED = ROOT / "tests" / "fixtures" / "repository" / "pooled-encoder" / "1"
TEXT = "the king is dead"
MODULE = "sentence_transformers.models."


def modules(*kinds):
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize", "Dense": "3_Dense"}
    return json.dumps([{"idx": i, "name": str(i), "path": paths[kind], "type": MODULE + kind}
                       for i, kind in enumerate(kinds)])


def st_version(repository, name, source, *, pooling, include_prompt=True, prompts=None,
               pipeline=("Transformer", "Pooling", "Normalize"), transformer_config=None):
    """A copy of `source` whose vector comes from sentence-transformers' files alone."""
    version = repository / name / "1"
    shutil.copytree(source, version)
    manifest = version / "model.toml"
    if manifest.exists():
        # The files decide pooling and normalizing; model.toml's [embed] would override them.
        text = manifest.read_text()
        manifest.write_text(text.split("[embed]")[0] + "[classify]" + text.split("[classify]")[1]
                            if "[embed]" in text else text)
    (version / "modules.json").write_text(modules(*pipeline))
    (version / "1_Pooling").mkdir()
    (version / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode": pooling, "include_prompt": include_prompt}))
    if prompts:
        (version / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
    for file, config in (transformer_config or {}).items():
        (version / file).write_text(json.dumps(config))
        if manifest.exists():
            # Where the limit comes from the Transformer module's config, not model.toml.
            manifest.write_text("".join(line for line in manifest.read_text().splitlines(True)
                                        if not line.startswith("max_length")))


@pytest.fixture(scope="module")
def st_channel(tmp_path_factory):
    repository = tmp_path_factory.mktemp("sentence-transformers")
    # The tiny encoder's byte-level tokenizer adds no special token; the pooled fixture's adds
    # [CLS] and [SEP], and its graph pools every token itself besides returning their states.
    st_version(repository, "tiny-instructed-mean", TINY, pooling="mean", include_prompt=False,
               prompts={"query": "query: "})
    st_version(repository, "tiny-instructed-cls", TINY, pooling="cls", include_prompt=False,
               prompts={"query": "query: "})
    st_version(repository, "pooled-instructed", POOLED, pooling="mean", include_prompt=False,
               prompts={"query": "a horse "})
    st_version(repository, "tiny-lowercased", TINY, pooling="mean",
               transformer_config={"sentence_roberta_config.json": {"max_seq_length": 64,
                                                                    "do_lower_case": True}})
    st_version(repository, "pooled-dense-last", POOLED, pooling="mean",
               pipeline=("Transformer", "Pooling", "Normalize", "Dense"))
    # The same graph with only its pooled output: the prompt cannot be pooled out here.
    st_version(repository, "pooled-only-instructed", POOLED, pooling="mean", include_prompt=False,
               prompts={"query": "a horse "})
    graph = onnx.load(str(POOLED / "model.onnx"))
    kept = [output for output in graph.graph.output if output.name != "token_embeddings"]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    onnx.save(graph, str(repository / "pooled-only-instructed" / "1" / "model.onnx"))
    # The same with a default prompt, which every request would use: refused at load.
    shutil.copytree(repository / "pooled-only-instructed", repository / "pooled-only-defaulted")
    (repository / "pooled-only-defaulted" / "1" / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "a horse "}, "default_prompt_name": "query"}))
    shutil.copytree(TINY, repository / "tiny-encoder" / "1")
    for address in serve(["--repository", str(repository)]):
        with grpc.insecure_channel(address) as channel:
            yield channel


def states(folder, output, ids):
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros((1, len(ids)), np.int64)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))[output][0]


def tokenizer(folder):
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def prompt_length(tok, prompt):
    """sentence-transformers 6.3: the prompt's tokens, less a trailing special token."""
    encoding = tok.encode(prompt)
    return len(encoding.ids) - (1 if encoding.special_tokens_mask[-1] else 0)


def unit(vector):
    vector = np.asarray(vector, np.float64)
    return vector / np.linalg.norm(vector)


def embed(channel, model, text=TEXT, **fields):
    stub = inference_pb2_grpc.InferenceStub(channel)
    return stub.Embed(inference_pb2.EmbedRequest(model=model, texts=[text], **fields)).embeddings[0]


@pytest.mark.parametrize("model,pooling", [("tiny-instructed-mean", "mean"), ("tiny-instructed-cls", "cls")])
def test_a_prompt_with_no_special_token_after_it_is_left_out_whole(st_channel, model, pooling):
    tok = tokenizer(TINY)
    ids = tok.encode("query: " + TEXT).ids
    length = prompt_length(tok, "query: ")
    assert length == len(tok.encode("query: ").ids), "this tokenizer adds no special token"
    token_states = states(TINY, "last_hidden_state", ids)
    want = token_states[length:].mean(axis=0) if pooling == "mean" else token_states[length]
    got = embed(st_channel, model, prompt_name="query")
    assert got.token_count == len(ids)
    np.testing.assert_allclose(got.values, unit(want), atol=2e-5)


def test_a_graph_that_pools_its_prompt_too_is_pooled_here(st_channel):
    tok = tokenizer(POOLED)
    ids = tok.encode("a horse " + TEXT).ids
    length = prompt_length(tok, "a horse ")
    assert length == len(tok.encode("a horse ").ids) - 1, "[SEP] ends the prompt alone"
    want = unit(states(POOLED, "token_embeddings", ids)[length:].mean(axis=0))
    got = embed(st_channel, "pooled-instructed", prompt_name="query")
    np.testing.assert_allclose(got.values, want, atol=2e-5)
    # The graph's own pooled output counts the prompt: another vector.
    graphs = unit(states(POOLED, "sentence_embedding", ids))
    assert np.abs(np.asarray(got.values) - graphs).max() > 1e-3
    settings = {s.name: (s.value, s.source) for s in models_pb2_grpc.ModelsStub(st_channel).GetModel(
        models_pb2.GetModelRequest(name="pooled-instructed")).versions[0].settings}
    assert settings["embed.pooling"] == ("mean", "1_Pooling/config.json")


def test_a_prompt_left_out_of_pooling_that_only_the_graph_could_pool_is_refused(st_channel):
    with pytest.raises(grpc.RpcError) as refused:
        embed(st_channel, "pooled-only-instructed", prompt_name="query")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for needle in ("prompt_name", "include_prompt false", 'prompt_name ""'):
        assert needle in refused.value.details()
    # Without the prompt the graph's pooled output is the model's vector.
    ids = tokenizer(POOLED).encode(TEXT).ids
    got = embed(st_channel, "pooled-only-instructed", prompt_name="")
    np.testing.assert_allclose(got.values, unit(states(POOLED, "sentence_embedding", ids)), atol=1e-5)


def test_a_default_prompt_that_only_the_graph_could_pool_fails_the_load(st_channel):
    version = models_pb2_grpc.ModelsStub(st_channel).GetModel(
        models_pb2.GetModelRequest(name="pooled-only-defaulted")).versions[0]
    assert version.state == models_pb2.LOAD_STATE_FAILED
    for needle in ("default_prompt_name `query`", "include_prompt false", "token_embeddings"):
        assert needle in version.load_error


def test_do_lower_case_lowercases_ahead_of_the_tokenizer(st_channel):
    reference = tokenizer(TINY)
    reference.normalizer = normalizers.Sequence([normalizers.Lowercase()])
    stub = inference_pb2_grpc.InferenceStub(st_channel)
    tokens = stub.Tokenize(inference_pb2.TokenizeRequest(model="tiny-lowercased", text="The KING")).tokens
    assert [t.id for t in tokens] == reference.encode("The KING").ids
    assert [t.id for t in tokens] != tokenizer(TINY).encode("The KING").ids, "the tokenizer is cased"
    lowered = embed(st_channel, "tiny-lowercased", "The KING")
    np.testing.assert_allclose(lowered.values, embed(st_channel, "tiny-encoder", "the king").values, atol=1e-6)
    settings = {s.name: (s.value, s.source) for s in models_pb2_grpc.ModelsStub(st_channel).GetModel(
        models_pb2.GetModelRequest(name="tiny-lowercased")).versions[0].settings}
    assert settings["max_length"] == ("64", "sentence_roberta_config.json")


def test_a_module_after_normalize_leaves_the_vector_unnormalized(st_channel):
    ids = tokenizer(POOLED).encode(TEXT).ids
    want = states(POOLED, "sentence_embedding", ids)
    assert abs(np.linalg.norm(want) - 1) > 1e-3
    got = embed(st_channel, "pooled-dense-last")
    np.testing.assert_allclose(got.values, want, atol=1e-5)
