"""Beam search as transformers' `generate` does it (`GenerationMixin._beam_search`, 4.57), written
out plainly in numpy, with onnxruntime models that recompute the whole sequence at every step.

Nothing here comes from the server: the search follows transformers' own source, and the model
adapters run the graphs of the model repository directly, without any cache. The test suite
compares the server's beam search with this one; `reference.json` of the seq2seq fixture (made by
transformers' generate) checks this one against transformers.

The rules, step by step (transformers' helper in brackets):

1. Every running beam's next-token log-probabilities are the log-softmax of its logits, in float32.
   The one logits processor written out is repetition_penalty [RepetitionPenaltyLogitsProcessor]:
   the log-probability of every token in the context (the prompt, or an encoder-decoder's start
   token) or in the beam, each once, is multiplied by the penalty where negative, else divided
   by it. (No minimum length or forced tokens.) A candidate continuation scores the beam's running
   score plus the token's processed log-probability; the model's own is what is reported.
2. The best K = max(2, 1 + len(eos_ids)) * num_beams candidates over beams x vocabulary are kept,
   best first [_get_top_k_continuations]. The search starts from one copy of the prompt (transformers
   starts num_beams copies, all but the first at -1e9, which no top-K ever reaches). Ties go to the
   lower beam, then the lower token (torch.topk leaves their order unspecified).
3. A candidate *ends* when its token is an end-of-sequence id or when it reaches max_new_tokens
   generated tokens (EosTokenCriteria, MaxLengthCriteria).
4. The next running beams are the best num_beams of the K after adding -1e9 to those that end
   [_get_running_beams_for_next_iteration]; the penalty stays in their running score.
5. Among the first num_beams of the K (not the extra ones), those that end become finished
   candidates with score = summed log-probs / (generated tokens ** length_penalty), the ending token
   counted. They are merged with the finished ones so far and the best num_beams kept
   [_update_finished_beams]. Nothing is added once every place is taken and early_stopping is True,
   nor once the early-stop heuristic has said that no improvement is possible (as of the previous
   step).
6. After the step [_check_early_stop_heuristic], when every one of the num_beams places holds a
   finished candidate, improvement stays possible only while
       best running score / L ** length_penalty  >  worst finished score
   with L = max_new_tokens when early_stopping == "never" and length_penalty > 0, else the number
   of tokens generated so far. Once impossible, it stays impossible.
7. The search stops [_beam_search_has_unfinished_sequences] when improvement is impossible, or every
   place is taken and early_stopping is True, or every one of the K candidates ended.
8. The result is the finished candidates, best first; transformers returns the first
   num_return_sequences of them.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

EXCLUDED = np.float32(-1.0e9)  # transformers' stand-in for minus infinity

# early_stopping as transformers spells it
FIRST_BEAMS = True
HEURISTIC = False
NEVER = "never"


@dataclass
class Hypothesis:
    tokens: list[int]
    logprobs: list[float]  # each token's log-softmax at its step
    score: float  # running: summed log-probs; finished: divided by the length penalty


@dataclass
class Candidate:
    beam: int
    token: int
    logprob: np.float32
    score: np.float32  # running score of its beam + logprob
    ends: bool


@dataclass
class Step:
    """What one step saw, for finding where two searches part ways."""

    generated: int
    running: list[list[int]]  # the beams the step extended
    candidates: list[Candidate]  # the K kept, best first
    finished: list[Hypothesis] = field(default_factory=list)  # after the step


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32)
    shifted = x - x.max()
    return (shifted - np.log(np.exp(shifted).sum(dtype=np.float32))).astype(np.float32)


def _best_first(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest scores, highest first, lower index first among equals."""
    return np.argsort(-scores, kind="stable")[:count]


def beam_search(
    next_logits: Callable[[Sequence[int]], np.ndarray],
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    length_penalty: float = 1.0,
    early_stopping: bool | str = HEURISTIC,
    repetition_penalty: float = 1.0,
    context: Sequence[int] = (),
    trace: list[Step] | None = None,
) -> list[Hypothesis]:
    """Runs the search; `next_logits(generated_tokens)` gives the logits of the next token after
    the prompt followed by `generated_tokens`. Returns the finished candidates, best first."""
    assert num_beams >= 1 and max_new_tokens >= 1
    assert early_stopping in (True, False, NEVER)
    eos_ids = [int(e) for e in eos_ids]
    keep = max(2, 1 + len(eos_ids)) * num_beams

    running = [Hypothesis([], [], np.float32(0.0))]  # the prompt alone
    finished: list[Hypothesis] = []
    improvement_possible = True

    for generated in range(1, max_new_tokens + 1):
        # 1. every continuation of every running beam
        model_log_probs = np.stack([log_softmax(next_logits(tuple(beam.tokens))) for beam in running])
        log_probs = model_log_probs.copy()
        if repetition_penalty != 1.0:
            for row, beam in enumerate(running):
                seen = sorted(set(int(t) for t in context) | set(beam.tokens))
                values = log_probs[row, seen]
                log_probs[row, seen] = np.where(values < 0, values * np.float32(repetition_penalty),
                                                values / np.float32(repetition_penalty))
        vocab = log_probs.shape[1]
        scores = (log_probs + np.array([b.score for b in running], dtype=np.float32)[:, None]).astype(np.float32)

        # 2. the best K
        top = _best_first(scores.reshape(-1), keep)
        candidates = []
        for flat in top:
            beam, token = divmod(int(flat), vocab)
            # 3. which end
            ends = token in eos_ids or generated >= max_new_tokens
            candidates.append(Candidate(beam, token, model_log_probs[beam, token], scores[beam, token], ends))

        def extend(c: Candidate, score) -> Hypothesis:
            parent = running[c.beam]
            return Hypothesis(parent.tokens + [c.token], parent.logprobs + [float(c.logprob)], score)

        # 5. finished candidates (decided before 4 replaces the running beams they extend)
        full = len(finished) == num_beams
        if improvement_possible and not (full and early_stopping is True):
            divisor = float(generated) ** length_penalty
            for c in candidates[:num_beams]:
                if c.ends:
                    finished.append(extend(c, np.float32(c.score / np.float32(divisor))))
            order = _best_first(np.array([h.score for h in finished], dtype=np.float32), num_beams)
            finished = [finished[i] for i in order]

        # 4. the next running beams
        penalised = np.array([c.score + (EXCLUDED if c.ends else 0) for c in candidates], dtype=np.float32)
        next_running = [extend(candidates[i], penalised[i]) for i in _best_first(penalised, num_beams)]
        if trace is not None:
            trace.append(Step(generated, [b.tokens for b in running], candidates, list(finished)))
        running = next_running

        # 6. can the running beams still beat the finished ones?
        if len(finished) == num_beams:
            if early_stopping == NEVER and length_penalty > 0.0:
                length = max_new_tokens
            else:
                length = generated
            best_running = np.float32(running[0].score / np.float32(float(length) ** length_penalty))
            worst_finished = finished[-1].score
            improvement_possible = improvement_possible and bool(best_running > worst_finished)

        # 7. stop?
        all_places_taken = len(finished) == num_beams and early_stopping is True
        if not improvement_possible or all_places_taken or all(c.ends for c in candidates):
            break

    return [Hypothesis(h.tokens, h.logprobs, float(h.score)) for h in finished]


def greedy(next_logits: Callable[[Sequence[int]], np.ndarray], *, max_new_tokens: int,
           eos_ids: Sequence[int]) -> list[int]:
    """The most likely token at every step (lower id on ties), until an end id or the limit."""
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        token = int(np.argmax(next_logits(tuple(tokens))))
        tokens.append(token)
        if token in eos_ids:
            break
    return tokens


def score_of(logprobs: Sequence[float], length_penalty: float) -> float:
    """A finished sequence's score from its tokens' log-probabilities."""
    return float(np.sum(np.asarray(logprobs, dtype=np.float64)) / len(logprobs) ** length_penalty)


# --- models --------------------------------------------------------------------------------------

def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _zeros_for(node) -> np.ndarray:
    """An empty past or a zero state: batch 1, every other named dimension 0 (the past length)."""
    shape = []
    for i, dim in enumerate(node.shape):
        if isinstance(dim, int):
            shape.append(dim)
        else:
            shape.append(1 if i == 0 else 0)
    assert node.type == "tensor(float)", node
    return np.zeros(shape, dtype=np.float32)


class DecoderOnlyModel:
    """A model of the repository whose graph maps a whole token sequence to logits: KV-cache
    decoders get an empty past, recurrent ones a zero state; the cache/state outputs are dropped."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        self.manifest = tomllib.loads((directory / "model.toml").read_text())
        self.session = _session(directory / "model.onnx")
        self.tokenizer = Tokenizer.from_file(str(directory / self.manifest.get("tokenizer", "tokenizer.json")))
        self.eos_ids = [int(e) for e in self.manifest["eos_token_ids"]]
        self.add_special_tokens = bool(self.manifest.get("add_special_tokens", True))
        self._inputs = self.session.get_inputs()
        self._fixed = {i.name: _zeros_for(i) for i in self._inputs
                       if i.name not in ("input_ids", "attention_mask", "position_ids")}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits of the token after `ids` (the whole sequence is run again)."""
        length = len(ids)
        feeds = dict(self._fixed)
        names = {i.name for i in self._inputs}
        feeds["input_ids"] = np.array([ids], dtype=np.int64)
        if "attention_mask" in names:
            feeds["attention_mask"] = np.ones((1, length), dtype=np.int64)
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(length, dtype=np.int64)[None, :]
        (logits,) = self.session.run(["logits"], feeds)
        return logits[0, -1].astype(np.float32)

    def for_prompt(self, prompt_ids: Sequence[int]) -> Callable[[Sequence[int]], np.ndarray]:
        prompt = tuple(int(i) for i in prompt_ids)

        @lru_cache(maxsize=None)
        def next_logits(generated: tuple[int, ...]) -> np.ndarray:
            return self.logits(prompt + tuple(generated))

        return next_logits


class Seq2SeqModel:
    """optimum's split seq2seq export: encoder_model.onnx once, then decoder_model.onnx (the
    no-past graph) on the decoder start token plus the whole target prefix at every step."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        self.encoder = _session(directory / "encoder_model.onnx")
        self.decoder = _session(directory / "decoder_model.onnx")
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        generation = json.loads((directory / "generation_config.json").read_text())
        self.decoder_start = int(generation["decoder_start_token_id"])
        eos = generation["eos_token_id"]
        self.eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def for_source(self, source_ids: Sequence[int]) -> Callable[[Sequence[int]], np.ndarray]:
        ids = np.array([list(source_ids)], dtype=np.int64)
        mask = np.ones_like(ids)
        (hidden,) = self.encoder.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})

        @lru_cache(maxsize=None)
        def next_logits(generated: tuple[int, ...]) -> np.ndarray:
            target = np.array([[self.decoder_start, *generated]], dtype=np.int64)
            (logits,) = self.decoder.run(["logits"], {
                "input_ids": target, "encoder_attention_mask": mask, "encoder_hidden_states": hidden})
            return logits[0, -1].astype(np.float32)

        return next_logits


def describe_step(step: Step, limit: int = 12) -> str:
    """One step's kept candidates, for a failure message."""
    lines = [f"step {step.generated}: running {step.running}"]
    for c in step.candidates[:limit]:
        lines.append(f"  beam {c.beam} token {c.token} logprob {float(c.logprob):.6f} "
                     f"score {float(c.score):.6f}{' ends' if c.ends else ''}")
    return "\n".join(lines)
