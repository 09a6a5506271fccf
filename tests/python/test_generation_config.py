"""What a model's generation config asks of generate, as transformers' generate does it.

BART and mBART set `forced_bos_token_id` (every target begins with `<s>` or a language code) and
Marian sets `forced_eos_token_id` (a translation cut by the length limit still ends with EOS);
summarizers set `no_repeat_ngram_size`, `min_length` and `max_length`, and opus-mt models
`bad_words_ids`. The models here are the untrained MarianMT fixture with those set in its
generation_config.json; the reference is a greedy loop in onnxruntime alone over its first-step
graph, recomputing the whole target each step, with the processors' rules applied by hand:
the first token is the forced BOS, the last one the length limit allows is the forced EOS, no
bigram occurs twice and no bad word is completed.
"""

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
import pytest
import tokenizers

from conftest import serve
from lmserve.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc

MARIAN = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "seq2seq" / "marian-tiny-untrained" / "1"
REFERENCE = json.loads((MARIAN / "reference.json").read_text())
TINY_GPT2 = Path(__file__).resolve().parents[2] / "models" / "repository" / "tiny-gpt2" / "1"
START = REFERENCE["special_tokens"]["decoder_start"]
EOS = REFERENCE["special_tokens"]["eos"]
FORCED_BOS = 7
SPECIAL_BOS = REFERENCE["special_tokens"]["pad"]
MAX_NEW_TOKENS = 12
NGRAM = 2
BAD_WORDS = [[385], [348, 754]]
# max_length and min_length count the start token, as transformers counts them.
CONSTRAINED_LENGTH = 16
LONG_LENGTH = 100


def greedy(source_ids, max_new_tokens, forced_bos=None, forced_eos=None, ngram=0, bad_words=()):
    """Greedy ids from onnxruntime, each step over the whole target so far (no cache), and each
    one's log-probability under the model's own distribution."""
    encoder = onnxruntime.InferenceSession(str(MARIAN / "encoder_model.onnx"), providers=["CPUExecutionProvider"])
    decoder = onnxruntime.InferenceSession(str(MARIAN / "decoder_model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([source_ids], dtype=np.int64)
    mask = np.ones_like(ids)
    (hidden,) = encoder.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})
    target = [START]
    logprobs = []
    for index in range(max_new_tokens):
        (logits,) = decoder.run(["logits"], {"input_ids": np.array([target], dtype=np.int64),
                                             "encoder_hidden_states": hidden, "encoder_attention_mask": mask})
        scores = logits[0, -1].copy()
        for word in bad_words:
            if len(word) == 1 or target[-(len(word) - 1):] == word[:-1]:
                scores[word[-1]] = -np.inf
        if ngram and len(target) + 1 >= ngram:
            tail = target[len(target) + 1 - ngram:]
            for start in range(len(target) - ngram + 1):
                if target[start:start + ngram - 1] == tail:
                    scores[target[start + ngram - 1]] = -np.inf
        token = int(np.argmax(scores))
        if index == max_new_tokens - 1 and forced_eos is not None:
            token = forced_eos
        elif index == 0 and forced_bos is not None:
            token = forced_bos
        target.append(token)
        last = logits[0, -1].astype(np.float64)
        logprobs.append(float(last[token] - last.max() - np.log(np.exp(last - last.max()).sum())))
        if token == EOS:
            break
    return target[1:], logprobs


@pytest.fixture(scope="module")
def forced_server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("forced")
    version = repository / "marian-forced" / "1"
    shutil.copytree(MARIAN, version)
    path = version / "generation_config.json"
    config = json.loads(path.read_text())
    config.update(forced_bos_token_id=FORCED_BOS, forced_eos_token_id=EOS)
    path.write_text(json.dumps(config))
    # The untrained model repeats itself: blocking repeated bigrams and a bad word change it.
    version = repository / "marian-constrained" / "1"
    shutil.copytree(MARIAN, version)
    path = version / "generation_config.json"
    config = json.loads(path.read_text())
    config.update(no_repeat_ngram_size=NGRAM, bad_words_ids=BAD_WORDS, max_length=CONSTRAINED_LENGTH + 1,
                  min_length=CONSTRAINED_LENGTH + 1, forced_eos_token_id=None)
    path.write_text(json.dumps(config))
    # A forced first token that is a special token, as BART's `<s>` and mBART's language codes are.
    version = repository / "marian-special-bos" / "1"
    shutil.copytree(MARIAN, version)
    path = version / "generation_config.json"
    config = json.loads(path.read_text())
    config.update(forced_bos_token_id=SPECIAL_BOS)
    path.write_text(json.dumps(config))
    # A max_length longer than the server's default length of 64 and shorter than the context.
    version = repository / "marian-long" / "1"
    shutil.copytree(MARIAN, version)
    path = version / "generation_config.json"
    config = json.loads(path.read_text())
    config.update(max_length=LONG_LENGTH + 1)
    path.write_text(json.dumps(config))
    # A decoder's max_length counts its prompt.
    version = repository / "gpt2-long" / "1"
    shutil.copytree(TINY_GPT2, version)
    with (version / "model.toml").open("a") as manifest:
        manifest.write(f"\n[generation]\nmax_length = {LONG_LENGTH}\n")
    yield from serve(["--repository", str(repository)])


def generate(channel, source, model="marian-forced", **parameters):
    stub = inference_pb2_grpc.InferenceStub(channel)
    parameters.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    request = inference_pb2.GenerateRequest(
        model=model, text=source, parameters=inference_pb2.GenerationParameters(**parameters))
    return stub.Generate(request, timeout=60).sequences[0]


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda case: case["source"][:20])
def test_greedy_begins_with_the_forced_bos_and_ends_at_the_limit_with_the_forced_eos(forced_server, case):
    want, logprobs = greedy(case["source_ids"], MAX_NEW_TOKENS, forced_bos=FORCED_BOS, forced_eos=EOS)
    assert want[0] == FORCED_BOS and want[-1] == EOS
    assert want != greedy(case["source_ids"], MAX_NEW_TOKENS)[0], "forcing must change this case"
    with grpc.insecure_channel(forced_server) as channel:
        sequence = generate(channel, case["source"])
    assert [token.id for token in sequence.tokens] == want
    # A forced token's reported log-probability is still the model's own.
    assert sequence.tokens[0].logprob == pytest.approx(logprobs[0], abs=1e-4)
    assert sequence.tokens[-1].logprob == pytest.approx(logprobs[-1], abs=1e-4)
    assert sequence.finish_reason == inference_pb2.FINISH_REASON_EOS


def test_special_tokens_are_left_out_of_the_text_as_transformers_pipelines_leave_them(forced_server):
    tokenizer = tokenizers.Tokenizer.from_file(str(MARIAN / "tokenizer.json"))
    assert tokenizer.id_to_token(SPECIAL_BOS) == "<pad>"
    with grpc.insecure_channel(forced_server) as channel:
        for case in REFERENCE["cases"]:
            sequence = generate(channel, case["source"], model="marian-special-bos")
            ids = [token.id for token in sequence.tokens]
            assert ids[0] == SPECIAL_BOS, case["source"]
            # What the summarization and translation pipelines return.
            assert sequence.text == tokenizer.decode(ids, skip_special_tokens=True), case["source"]
            assert not sequence.text.startswith("<pad>")
            kept = generate(channel, case["source"], model="marian-special-bos", keep_special_tokens=True)
            # The end-of-sequence token that ends the output is never part of its text.
            shown = ids[:-1] if ids[-1] == EOS else ids
            assert kept.text == tokenizer.decode(shown, skip_special_tokens=False), case["source"]
            assert kept.text.startswith("<pad>")


def test_a_caller_who_ignores_eos_gets_the_model_s_last_token(forced_server):
    case = REFERENCE["cases"][0]
    want, _ = greedy(case["source_ids"], MAX_NEW_TOKENS, forced_bos=FORCED_BOS)
    with grpc.insecure_channel(forced_server) as channel:
        sequence = generate(channel, case["source"], ignore_eos=True)
    assert [token.id for token in sequence.tokens] == want
    assert sequence.finish_reason == inference_pb2.FINISH_REASON_LENGTH


def test_beams_begin_and_end_with_the_forced_tokens(forced_server):
    with grpc.insecure_channel(forced_server) as channel:
        for case in REFERENCE["cases"]:
            ids = [token.id for token in generate(channel, case["source"], num_beams=4).tokens]
            assert ids[0] == FORCED_BOS, case["source"]
            assert ids[-1] == EOS and len(ids) <= MAX_NEW_TOKENS, case["source"]


def test_more_beam_answers_than_ways_through_the_forced_places_repeat_the_last(forced_server):
    # Forced first and last tokens and two new tokens: one sequence is possible, two are asked.
    case = REFERENCE["cases"][0]
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(forced_server))
    request = inference_pb2.GenerateRequest(
        model="marian-forced", text=case["source"],
        parameters=inference_pb2.GenerationParameters(max_new_tokens=2, num_beams=4, n=2))
    sequences = stub.Generate(request, timeout=60).sequences
    assert [[token.id for token in s.tokens] for s in sequences] == [[FORCED_BOS, EOS]] * 2


def test_get_model_shows_the_forced_tokens_and_their_file(forced_server):
    with grpc.insecure_channel(forced_server) as channel:
        models = models_pb2_grpc.ModelsStub(channel)
        version = models.GetModel(models_pb2.GetModelRequest(name="marian-forced")).versions[0]
    settings = {setting.name: setting for setting in version.settings}
    assert settings["forced_bos_token_id"].value == str(FORCED_BOS)
    assert settings["forced_bos_token_id"].source == "generation_config.json"
    assert settings["forced_eos_token_ids"].value == f"[{EOS}]"
    # The file names no top_k: sampling takes transformers' GenerationConfig default of 50.
    assert (settings["generation.top_k"].value, settings["generation.top_k"].source) == ("50", "default")
    with grpc.insecure_channel(forced_server) as channel:
        models = models_pb2_grpc.ModelsStub(channel)
        version = models.GetModel(models_pb2.GetModelRequest(name="marian-constrained")).versions[0]
    settings = {setting.name: setting.value for setting in version.settings}
    assert settings["generation.no_repeat_ngram_size"] == str(NGRAM)
    assert settings["generation.bad_words_ids"] == str(BAD_WORDS)


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda case: case["source"][:20])
def test_repeated_ngrams_bad_words_and_length_limits_from_the_generation_config(forced_server, case):
    want, _ = greedy(case["source_ids"], CONSTRAINED_LENGTH, ngram=NGRAM, bad_words=BAD_WORDS)
    plain, _ = greedy(case["source_ids"], CONSTRAINED_LENGTH)
    assert want != plain, "the constraints must change this case"
    with grpc.insecure_channel(forced_server) as channel:
        # No max_new_tokens: max_length gives the length, min_length keeps EOS out till then.
        sequence = generate(channel, case["source"], model="marian-constrained", max_new_tokens=None)
        assert [token.id for token in sequence.tokens] == want
        beams = generate(channel, case["source"], model="marian-constrained", max_new_tokens=None, num_beams=4)
    ids = [token.id for token in beams.tokens]
    bigrams = list(zip([START] + ids, ids))
    assert len(bigrams) == len(set(bigrams)), ids
    assert 385 not in ids and (348, 754) not in bigrams, ids
    assert len(ids) == CONSTRAINED_LENGTH


def test_min_new_tokens_is_held_to_the_length_the_model_s_max_length_gives(forced_server):
    case = REFERENCE["cases"][0]
    with grpc.insecure_channel(forced_server) as channel:
        # Past the server's default length, within the model's own: EOS is held back till then.
        sequence = generate(channel, case["source"], model="marian-long", max_new_tokens=None,
                            min_new_tokens=90)
        assert 90 <= len(sequence.tokens) <= LONG_LENGTH
        with pytest.raises(grpc.RpcError) as refused:
            generate(channel, case["source"], model="marian-long", max_new_tokens=None,
                     min_new_tokens=LONG_LENGTH + 1)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = refused.value.details()
    assert "parameters.min_new_tokens" in message and f"{LONG_LENGTH + 1}" in message, message
    assert f"the {LONG_LENGTH} new tokens the model's max_length of {LONG_LENGTH + 1}" in message, message


def test_a_decoder_s_max_length_counts_its_prompt(forced_server):
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(forced_server))

    def generate_after(prompt, **parameters):
        request = inference_pb2.GenerateRequest(
            model="gpt2-long", text=prompt, parameters=inference_pb2.GenerationParameters(**parameters))
        return stub.Generate(request, timeout=60).sequences[0]

    prompt = "To be, or not to be, that is the question"
    sequence = generate_after(prompt, ignore_eos=True)
    prompt_tokens = LONG_LENGTH - len(sequence.tokens)
    assert prompt_tokens > 1, "the prompt must take more than one token for the case below"
    # Within what max_length leaves after the prompt; then one more, refused once the prompt
    # is counted (before tokenizing it still fits the most max_length could leave).
    assert len(generate_after(prompt, min_new_tokens=LONG_LENGTH - prompt_tokens).tokens) == LONG_LENGTH - prompt_tokens
    with pytest.raises(grpc.RpcError) as refused:
        generate_after(prompt, min_new_tokens=LONG_LENGTH - prompt_tokens + 1)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = refused.value.details()
    assert "parameters.min_new_tokens" in message and "after this prompt" in message, message
    assert f"the {LONG_LENGTH - prompt_tokens} new tokens the model's max_length of {LONG_LENGTH}" in message, message
