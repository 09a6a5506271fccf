"""The server's beam search against beam_reference.py, a numpy + onnxruntime beam search written
from transformers' `_beam_search` that recomputes the whole sequence at every step, and against
the transformers-made reference.json of the seq2seq fixture."""

import json
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import grpc
import pytest

import beam_reference as ref
from conftest import ROOT, serve
from lmserve.v1 import inference_pb2, inference_pb2_grpc

REPOSITORY = ROOT / "models" / "repository"
SEQ2SEQ = ROOT / "tests" / "fixtures" / "seq2seq"
TOLERANCE = 1e-4

MODELS = ["tiny-gpt2", "tiny-llama", "tiny-lstm", "tiny-transformer-lm"]
PROMPTS = ["To be, or not to be", "ROMEO.", "My lord,"]

ES = {
    True: inference_pb2.EARLY_STOPPING_FIRST_BEAMS,
    False: inference_pb2.EARLY_STOPPING_HEURISTIC,
    ref.NEVER: inference_pb2.EARLY_STOPPING_NEVER,
}

# (num_beams, early_stopping, length_penalty, max_new_tokens, n)
SETTINGS = {
    "first-beams": (3, ref.FIRST_BEAMS, 1.0, 12, 1),
    "heuristic": (4, ref.HEURISTIC, 0.6, 10, 2),
    "never": (2, ref.NEVER, 1.5, 8, 1),
}
# The tiny models almost never produce their end-of-sequence id (0) this early, so every setting
# also runs with frequent tokens ("\n" and ",") as stop_token_ids: the server ends beams on them
# exactly as on its EOS ids, which exercises finishing, the length penalty and early stopping.
STOPS = {"eos": (), "stop-newline-comma": (199, 12)}

CASES = [
    (model, prompt, setting, stop)
    for model in MODELS for prompt in PROMPTS for setting in SETTINGS for stop in STOPS
]


def case_id(case):
    model, prompt, setting, stop = case
    return f"{model}-{prompt.split(',')[0].replace(' ', '_').rstrip('.')}-{setting}-{stop}"


@lru_cache(maxsize=None)
def decoder(model):
    return ref.DecoderOnlyModel(REPOSITORY / model / "1")


@lru_cache(maxsize=None)
def seq2seq(model):
    return ref.Seq2SeqModel(SEQ2SEQ / model / "1")


def eos_ids(model, stop):
    return decoder(model).eos_ids + list(STOPS[stop])


@lru_cache(maxsize=None)
def expected(model, prompt, setting, stop):
    num_beams, early_stopping, length_penalty, max_new_tokens, _ = SETTINGS[setting]
    lm = decoder(model)
    return ref.beam_search(lm.for_prompt(lm.encode(prompt)), num_beams=num_beams,
                           max_new_tokens=max_new_tokens, eos_ids=eos_ids(model, stop),
                           length_penalty=length_penalty, early_stopping=early_stopping)


def request(model, prompt, setting, stop):
    num_beams, early_stopping, length_penalty, max_new_tokens, n = SETTINGS[setting]
    return inference_pb2.GenerateRequest(model=model, text=prompt, parameters=inference_pb2.GenerationParameters(
        max_new_tokens=max_new_tokens, num_beams=num_beams, early_stopping=ES[early_stopping],
        length_penalty=length_penalty, n=n, stop_token_ids=STOPS[stop]))


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def explain(next_logits, search, got_ids, want_ids):
    """The reference's candidates at the step where the server's sequence leaves it."""
    trace = []
    ref.beam_search(next_logits, trace=trace, **search)
    at = first_difference(got_ids, want_ids)
    steps = [s for s in trace if s.generated in (at, at + 1)]
    return f"first difference at generated token {at}\n" + "\n".join(ref.describe_step(s) for s in steps)


def assert_same(response, hypotheses, n, length_penalty, ends, explain_with):
    assert len(response.sequences) == n
    for index, (sequence, want) in enumerate(zip(response.sequences, hypotheses[:n])):
        assert sequence.index == index
        ids = [t.id for t in sequence.tokens]
        logprobs = [t.logprob for t in sequence.tokens]
        if ids != want.tokens:
            pytest.fail(f"sequence {index}: server {ids} (score {ref.score_of(logprobs, length_penalty):.6f}) "
                        f"!= reference {want.tokens} (score {want.score:.6f})\n"
                        f"server logprobs {logprobs}\nreference logprobs {want.logprobs}\n"
                        + explain_with(ids, want.tokens))
        for step, (got, wanted) in enumerate(zip(logprobs, want.logprobs)):
            assert abs(got - wanted) <= TOLERANCE, f"sequence {index} token {step}: logprob {got} vs {wanted}"
        score = ref.score_of(logprobs, length_penalty)
        assert abs(score - want.score) <= TOLERANCE, f"sequence {index}: score {score} vs {want.score}"
        reason = inference_pb2.FINISH_REASON_EOS if ids[-1] in ends else inference_pb2.FINISH_REASON_LENGTH
        assert sequence.finish_reason == reason


def check_case(response, model, prompt, setting, stop):
    num_beams, early_stopping, length_penalty, max_new_tokens, n = SETTINGS[setting]
    lm = decoder(model)
    prompt_ids = lm.encode(prompt)
    assert response.prompt_tokens == len(prompt_ids)
    search = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, eos_ids=eos_ids(model, stop),
                  length_penalty=length_penalty, early_stopping=early_stopping)
    assert_same(response, expected(model, prompt, setting, stop), n, length_penalty, eos_ids(model, stop),
                lambda got, want: explain(lm.for_prompt(prompt_ids), search, got, want))


@pytest.fixture(scope="module")
def stub(server_address):
    with grpc.insecure_channel(server_address) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


@pytest.mark.parametrize("model", MODELS)
def test_reference_prompt_ids_are_the_servers(stub, model):
    committed = json.loads((REPOSITORY / model / "1" / "reference.json").read_text())["generate"]["cases"]
    for case in committed:
        ids = decoder(model).encode(case["prompt"])
        assert ids == case["prompt_ids"]
        tokens = stub.Tokenize(inference_pb2.TokenizeRequest(model=model, text=case["prompt"])).tokens
        assert [t.id for t in tokens] == ids


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_beam_search_matches_the_reference(stub, case):
    check_case(stub.Generate(request(*case)), *case)


def test_concurrent_requests_batched_together_give_the_same_results(stub):
    """Every beam case at once, with greedy requests mixed in: batching changes nothing."""
    greedy = []
    for model in MODELS:
        committed = json.loads((REPOSITORY / model / "1" / "reference.json").read_text())["generate"]
        for case in committed["cases"]:
            greedy.append((inference_pb2.GenerateRequest(
                model=model, text=case["prompt"], parameters=inference_pb2.GenerationParameters(
                    max_new_tokens=committed["max_new_tokens"], ignore_eos=True)), case["greedy_ids"]))
    with ThreadPoolExecutor(max_workers=16) as pool:
        beams = [pool.submit(stub.Generate, request(*case)) for case in CASES]
        plain = [pool.submit(stub.Generate, r) for r, _ in greedy]
        for case, future in zip(CASES, beams):
            check_case(future.result(), *case)
        for (_, ids), future in zip(greedy, plain):
            assert [t.id for t in future.result().sequences[0].tokens] == ids


@pytest.mark.parametrize("model", MODELS)
def test_one_beam_is_greedy(stub, model):
    lm = decoder(model)
    for prompt in PROMPTS:
        plain = stub.Generate(inference_pb2.GenerateRequest(
            model=model, text=prompt, parameters=inference_pb2.GenerationParameters(max_new_tokens=12)))
        one = stub.Generate(inference_pb2.GenerateRequest(
            model=model, text=prompt, parameters=inference_pb2.GenerationParameters(max_new_tokens=12, num_beams=1)))
        ids = [t.id for t in one.sequences[0].tokens]
        assert ids == [t.id for t in plain.sequences[0].tokens]
        assert one.sequences[0].text == plain.sequences[0].text
        assert ids == ref.greedy(lm.for_prompt(lm.encode(prompt)), max_new_tokens=12, eos_ids=lm.eos_ids)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-lstm"])
def test_stream_with_beams_matches_unary(stub, model):
    req = request(model, "ROMEO.", "heuristic", "eos")
    unary = stub.Generate(req)
    messages = list(stub.GenerateStream(req))
    assert messages[0].prompt_tokens == unary.prompt_tokens
    for sequence in unary.sequences:
        mine = [m for m in messages if m.index == sequence.index]
        assert "".join(m.text for m in mine) == sequence.text
        assert [m.token.id for m in mine if m.HasField("token")] == [t.id for t in sequence.tokens]
        assert [m.token.logprob for m in mine if m.HasField("token")] == [t.logprob for t in sequence.tokens]
        assert mine[-1].finish_reason == sequence.finish_reason
    check_case(unary, model, "ROMEO.", "heuristic", "eos")


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_a_repetition_penalty_applies_to_every_beam_as_transformers_applies_it(stub, model):
    """Its scores rank the beams; the log-probabilities reported stay the model's own."""
    lm = decoder(model)
    penalty, max_new_tokens = 1.8, 16
    for prompt in PROMPTS:
        prompt_ids = lm.encode(prompt)
        search = dict(num_beams=3, max_new_tokens=max_new_tokens, eos_ids=lm.eos_ids,
                      length_penalty=1.0, early_stopping=ref.HEURISTIC,
                      repetition_penalty=penalty, context=prompt_ids)
        want = ref.beam_search(lm.for_prompt(prompt_ids), **search)
        plain = ref.beam_search(lm.for_prompt(prompt_ids), **dict(search, repetition_penalty=1.0))
        response = stub.Generate(inference_pb2.GenerateRequest(
            model=model, text=prompt, parameters=inference_pb2.GenerationParameters(
                max_new_tokens=max_new_tokens, num_beams=3, n=2, repetition_penalty=penalty)))
        for sequence, expected in zip(response.sequences, want[:2]):
            ids = [t.id for t in sequence.tokens]
            assert ids == expected.tokens, (
                f"{prompt!r}: server {ids} != reference {expected.tokens}\n"
                + explain(lm.for_prompt(prompt_ids), search, ids, expected.tokens))
            for got, wanted in zip([t.logprob for t in sequence.tokens], expected.logprobs):
                assert abs(got - wanted) <= TOLERANCE
        # The penalty changes what the search finds, or this would test nothing.
        assert want[0].tokens != plain[0].tokens, prompt


@pytest.mark.parametrize("parameters, field", [
    (dict(num_beams=3, do_sample=True), "parameters.do_sample"),
    (dict(num_beams=3, n=5), "parameters.n"),
    (dict(num_beams=3, early_stopping=9), "parameters.early_stopping"),
    (dict(num_beams=3, top_logprobs=2), "parameters.top_logprobs"),
])
def test_invalid_beam_requests(stub, parameters, field):
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(inference_pb2.GenerateRequest(
            model="tiny-gpt2", text="ROMEO.",
            parameters=inference_pb2.GenerationParameters(max_new_tokens=4, **parameters)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()


# --- the optimum seq2seq layout ------------------------------------------------------------------

MARIAN = ["marian-tiny-untrained", "marian-tiny-untrained-merged"]


@pytest.fixture(scope="module")
def seq2seq_stub():
    for address in serve(["--repository", str(SEQ2SEQ)]):
        with grpc.insecure_channel(address) as channel:
            yield inference_pb2_grpc.InferenceStub(channel)


def marian_reference():
    return json.loads((SEQ2SEQ / "marian-tiny-untrained" / "1" / "reference.json").read_text())


def test_reference_reproduces_transformers_on_marian():
    """The reference itself: transformers' greedy and beam search (num_beams=4, early_stopping=True)
    as reference.json recorded them."""
    committed = marian_reference()
    model = seq2seq("marian-tiny-untrained")
    for case in committed["cases"]:
        assert model.encode(case["source"]) == case["source_ids"]
        next_logits = model.for_source(case["source_ids"])
        assert ref.greedy(next_logits, max_new_tokens=20, eos_ids=model.eos_ids) == case["greedy"]["ids"]
        best = ref.beam_search(next_logits, num_beams=4, max_new_tokens=20, eos_ids=model.eos_ids,
                               length_penalty=1.0, early_stopping=True)[0]
        assert best.tokens == case["beam"]["ids"]
        assert abs(best.score - case["beam"]["score"]) <= TOLERANCE


@pytest.mark.parametrize("model", MARIAN)
def test_seq2seq_greedy_and_beam_match_transformers(seq2seq_stub, model):
    committed = marian_reference()
    assert committed["generation_settings"]["beam"]["num_beams"] == 4
    reference_model = seq2seq("marian-tiny-untrained")
    for case in committed["cases"]:
        greedy = seq2seq_stub.Generate(inference_pb2.GenerateRequest(
            model=model, text=case["source"], parameters=inference_pb2.GenerationParameters(max_new_tokens=20)))
        assert [t.id for t in greedy.sequences[0].tokens] == case["greedy"]["ids"]
        assert greedy.prompt_tokens == len(case["source_ids"])

        beam = seq2seq_stub.Generate(inference_pb2.GenerateRequest(
            model=model, text=case["source"], parameters=inference_pb2.GenerationParameters(
                max_new_tokens=20, num_beams=4, n=4, early_stopping=inference_pb2.EARLY_STOPPING_FIRST_BEAMS)))
        best = beam.sequences[0]
        assert [t.id for t in best.tokens] == case["beam"]["ids"]
        assert abs(ref.score_of([t.logprob for t in best.tokens], 1.0) - case["beam"]["score"]) <= TOLERANCE
        # All four against the reference, which reference.json only records the best of.
        search = dict(num_beams=4, max_new_tokens=20, eos_ids=reference_model.eos_ids,
                      length_penalty=1.0, early_stopping=True)
        next_logits = reference_model.for_source(case["source_ids"])
        assert_same(beam, ref.beam_search(next_logits, **search), 4, 1.0, reference_model.eos_ids,
                    lambda got, want: explain(next_logits, search, got, want))
