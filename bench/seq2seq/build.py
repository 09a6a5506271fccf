"""Builds an untrained MarianMT (Hugging Face transformers' architecture, random seeded weights)
and exports it with optimum's ONNX exporter, to prove the server reads optimum's seq2seq layout:
encoder_model.onnx + decoder_model.onnx + decoder_with_past_model.onnx, and the merged
decoder_model_merged.onnx (one graph with an `If` on `use_cache_branch`).

No model hub is reachable, so the model is built from a config; for the layout, untrained and
trained weights are the same work. The tokenizer is a byte-level BPE of 998 tokens trained on
bench/texts.txt, with `<pad>` and `</s>` appended and a post-processor that ends every source with
`</s>`, as Marian's does.

    python bench/seq2seq/build.py OUT [--size tiny|bench]

writes
    OUT/marian-<size>-untrained/1/         encoder, decoder and decoder_with_past graphs;
                                           model.toml serves those
    OUT/marian-<size>-untrained-merged/1/  encoder + merged decoder only; model.toml serves those
each with config.json, generation_config.json, tokenizer.json, graphs.txt (every graph's tensor
names, dtypes and shapes) and reference.json: greedy and beam outputs for six sentences,
computed by transformers (PyTorch), by optimum's ORTModelForSeq2SeqLM (split and merged) and by
a plain onnxruntime loop (split and merged), which must agree or the build fails.

Uses one CPU thread throughout. Needs the pins of requirements.txt beside this file.
"""
import os
import sys

# optimum's decoder merge names the shared initializers by iterating over sets of strings: fix
# the string hash so that a rebuild writes byte-identical graphs.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import importlib.metadata as metadata  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402


class _OneThreadSessionOptions(ort.SessionOptions):
    """optimum's export validation builds its own SessionOptions: make every one single-threaded."""

    def __init__(self):
        super().__init__()
        self.intra_op_num_threads = 1
        self.inter_op_num_threads = 1


ort.SessionOptions = _OneThreadSessionOptions

import torch  # noqa: E402
from tokenizers import (AddedToken, Tokenizer, decoders, models, pre_tokenizers,  # noqa: E402
                        trainers)
from tokenizers.processors import TemplateProcessing  # noqa: E402
from transformers import GenerationConfig, MarianConfig, MarianMTModel  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
TEXTS = os.path.join(REPO, "bench", "texts.txt")  # the tokenizer's training text
VOCAB = 1000  # learned byte-level BPE tokens + <pad> + </s>
# torch seed: with seed 0 the tiny model's smallest top-2 logit margin over the six references is
# 0.0018; seed 52's is 0.0050, its six greedy outputs differ from the first three tokens on and none
# of them repeats one token more than twice running.
SEED = 52
MAX_NEW_TOKENS = 20
MAX_LENGTH = 128  # model.toml's max_length and generation_config's max_length
SIZES = {
    # name: (d_model, encoder layers, decoder layers, heads, ffn, init_std, max positions)
    # init_std: Marian's default 0.02 leaves the tiny model's output nearly independent of its
    # source (scaled 64-wide token embeddings drown under the sinusoidal positions); 0.1 makes
    # every reference sentence decode differently with top-2 logit margins above 1e-3 (see SEED).
    # max positions: the sinusoidal table is a weight of every graph; the tiny one holds 128 rows,
    # model.toml's max_length (the server caps source + generated tokens at it), to stay small.
    "tiny": (64, 2, 2, 4, 128, 0.1, 128),
    "bench": (512, 6, 6, 8, 2048, 0.02, 512),  # Marian base (opus-mt)
}
SOURCES = [
    "To be, or not to be, that is the question.",
    "The quick brown fox jumps over the lazy dog.",
    "Where is the train station?",
    "I would like a cup of tea, please.",
    "The weather is fine today, and the sea is calm.",
    "Good night, sweet prince.",
]
GRAPHS = ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx",
          "decoder_model_merged.onnx"]
SPLIT_GRAPHS = ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"]
MERGED_GRAPHS = ["encoder_model.onnx", "decoder_model_merged.onnx"]


def versions() -> dict:
    return {p: metadata.version(p) for p in
            ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "tokenizers")}


def session(path: str) -> ort.InferenceSession:
    return ort.InferenceSession(path, sess_options=_OneThreadSessionOptions(),
                                providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- tokenizer


def _training_lines() -> list:
    with open(TEXTS, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def build_tokenizer(path: str) -> Tokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer and decoder) trained on bench/texts.txt, with
    `<pad>` and `</s>` appended after the learned vocabulary, as Marian's pad is its last id."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    base = VOCAB - 2
    trainer = trainers.BpeTrainer(vocab_size=base, min_frequency=2, show_progress=False,
                                  special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = _training_lines()
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    assert tok.get_vocab_size() == base, (tok.get_vocab_size(), base)
    tok.add_special_tokens([AddedToken("<pad>", special=True, normalized=False),
                            AddedToken("</s>", special=True, normalized=False)])
    pad, eos = tok.token_to_id("<pad>"), tok.token_to_id("</s>")
    assert (pad, eos) == (base, base + 1), (pad, eos, base)
    tok.post_processor = TemplateProcessing(single="$A </s>", pair="$A $B </s>",
                                            special_tokens=[("</s>", eos)])
    tok.save(path)
    # also in the model's own vocabulary, as converted Marian tokenizers have them, so that the
    # vocabulary size is VOCAB with or without the added tokens
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    doc["model"]["vocab"].update({"<pad>": pad, "</s>": eos})
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=2)
        f.write("\n")
    tok = Tokenizer.from_file(path)
    assert tok.get_vocab_size(with_added_tokens=False) == tok.get_vocab_size() == VOCAB
    # every byte is in the alphabet, so any text round-trips
    for text in lines + SOURCES + ["caf\u00e9 \u2014 \u00fcber \U0001f600  two  spaces\n"]:
        ids = tok.encode(text, add_special_tokens=True).ids
        assert ids[-1] == eos and pad not in ids and eos not in ids[:-1], text
        assert tok.decode(ids, skip_special_tokens=True) == text, text
    return tok


# ---------------------------------------------------------------- graphs.txt

_DTYPES = {v: k for k, v in onnx.TensorProto.DataType.items()}


def _describe(value_info) -> str:
    t = value_info.type.tensor_type
    dims = [d.dim_param if d.dim_param else (str(d.dim_value) if d.HasField("dim_value") else "?")
            for d in t.shape.dim]
    return f"{value_info.name}: {_DTYPES[t.elem_type].lower()} [{', '.join(dims)}]"


def describe_graphs(folder: str) -> str:
    lines = []
    for name in GRAPHS:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        m = onnx.load(path, load_external_data=False)
        opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in m.opset_import)
        lines.append(f"== {name} ({os.path.getsize(path)} bytes; opset {opsets}; "
                     f"{len(m.graph.node)} top-level nodes)")
        lines.append("inputs:")
        lines += [f"  {_describe(v)}" for v in m.graph.input]
        lines.append("outputs:")
        lines += [f"  {_describe(v)}" for v in m.graph.output]
        lines.append("")
    if os.path.exists(os.path.join(folder, "decoder_model_merged.onnx")):
        lines += MERGED_NOTES
    return "\n".join(lines)


MERGED_NOTES = [
    "== how decoder_model_merged.onnx is fed (as optimum's ORTModelForSeq2SeqLM does)",
    "first step: use_cache_branch = [false] (bool, shape [1]); every past_key_values.* input,",
    "  .decoder. and .encoder. alike, is float zeros of shape [batch, heads, 0, head_dim];",
    "  outputs logits and all present.* (.encoder.* = the cross-attention key/values, kept)",
    "later steps: use_cache_branch = [true]; past_key_values.N.decoder.* = the last step's",
    "  present.N.decoder.*, past_key_values.N.encoder.* = the FIRST step's present.N.encoder.*;",
    "  the present.N.encoder.* outputs of this branch are placeholders of shape",
    "  [0, heads, 1, head_dim] and must be ignored",
    "encoder_hidden_states is a required input on every step (the cache branch ignores it)",
    "",
]


# ---------------------------------------------------------------- generation settings


def generation_kwargs(pad: int, eos: int) -> dict:
    # Plain greedy / beam search: every logits processor that a Marian generation config may
    # switch on (bad_words_ids=[[pad]] in the opus-mt configs, forced eos, n-gram blocking,
    # repetition penalty, a minimum length) is explicitly off.
    return dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, decoder_start_token_id=pad,
                eos_token_id=eos, pad_token_id=pad, bad_words_ids=None, forced_eos_token_id=None,
                forced_bos_token_id=None, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
                repetition_penalty=1.0, min_length=0, length_penalty=1.0, use_cache=True,
                temperature=None, top_k=None, top_p=None)


GREEDY = dict(num_beams=1)
BEAM = dict(num_beams=4, early_stopping=True, num_return_sequences=1, output_scores=True,
            return_dict_in_generate=True)


def hf_generate(model, ids: list, kw: dict) -> dict:
    """transformers' generate (PyTorch or optimum's ORTModel): ids without the start token."""
    input_ids = torch.tensor([ids], dtype=torch.long)
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        g = model.generate(input_ids=input_ids, attention_mask=mask, output_scores=True,
                           return_dict_in_generate=True, **kw, **GREEDY)
        b = model.generate(input_ids=input_ids, attention_mask=mask, **kw, **BEAM)
    start = kw["decoder_start_token_id"]
    assert int(g.sequences[0, 0]) == start and int(b.sequences[0, 0]) == start
    # no logits processor is on, so greedy's scores are the raw logits of each step
    top2 = [s[0].topk(2).values for s in g.scores]
    first = g.scores[0][0].topk(5)
    return {"greedy": g.sequences[0, 1:].tolist(), "beam": b.sequences[0, 1:].tolist(),
            "beam_score": float(b.sequences_scores[0]),
            "min_margin": min(float(t[0] - t[1]) for t in top2),
            "first_step_top5": [{"id": int(i), "logit": float(v)}
                                for v, i in zip(first.values, first.indices)]}


def ort_greedy(folder: str, ids: list, pad: int, eos: int, merged: bool) -> list:
    """Greedy decoding over optimum's graphs with onnxruntime alone (no optimum, no torch)."""
    enc = session(os.path.join(folder, "encoder_model.onnx"))
    src = np.array([ids], dtype=np.int64)
    mask = np.ones_like(src)
    hidden = enc.run(["last_hidden_state"], {"input_ids": src, "attention_mask": mask})[0]
    if merged:
        first = step = session(os.path.join(folder, "decoder_model_merged.onnx"))
    else:
        first = session(os.path.join(folder, "decoder_model.onnx"))
        step = session(os.path.join(folder, "decoder_with_past_model.onnx"))
    past_names = [i.name for i in step.get_inputs() if i.name.startswith("past_key_values.")]
    out, cache, token = [], {}, pad
    for n in range(MAX_NEW_TOKENS):
        sess = first if n == 0 else step
        feed = {"input_ids": np.array([[token]], dtype=np.int64),
                "encoder_attention_mask": mask, "encoder_hidden_states": hidden}
        input_names = {i.name for i in sess.get_inputs()}
        if "use_cache_branch" in input_names:
            feed["use_cache_branch"] = np.array([n > 0], dtype=bool)
            if n == 0:  # optimum's dummy past on the first step: zero-length sequence axis
                for i in sess.get_inputs():
                    if i.name.startswith("past_key_values."):
                        heads, head_dim = i.shape[1], i.shape[3]
                        feed[i.name] = np.zeros((1, heads, 0, head_dim), dtype=np.float32)
        if n > 0:
            feed.update({name: cache[name] for name in past_names})
        feed = {k: v for k, v in feed.items() if k in input_names}
        names = [o.name for o in sess.get_outputs()]
        values = sess.run(names, feed)
        result = dict(zip(names, values))
        for name, value in result.items():
            if name.startswith("present."):
                past = "past_key_values." + name[len("present."):]
                # the cross-attention key/values come from the first step only: decoder_with_past
                # does not output them, and the merged graph's cache branch outputs placeholders
                # of shape [0, heads, 1, head_dim] in their place
                if n == 0 or ".encoder." not in name:
                    cache[past] = value
        token = int(result["logits"][0, -1].argmax())
        out.append(token)
        if token == eos:
            break
    return out


# ---------------------------------------------------------------- build


def model_toml(shape: str, version: str, merged: bool) -> str:
    graphs = ('encoder = "encoder_model.onnx"\ndecoder_merged = "decoder_model_merged.onnx"\n'
              if merged else
              'encoder = "encoder_model.onnx"\ndecoder = "decoder_model.onnx"\n'
              'decoder_with_past = "decoder_with_past_model.onnx"\n')
    return (f'family = "encoder-decoder"\ntasks = ["generate"]\n'
            f'description = "MarianMT\'s architecture ({shape}) with random weights, exported by '
            f'{version}: proves the optimum seq2seq layout"\n'
            f'tokenizer = "tokenizer.json"\nmax_length = {MAX_LENGTH}\n\n[graphs]\n{graphs}')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    warnings.filterwarnings("ignore")
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    t0 = time.time()
    timings = {}
    vers = versions()
    name = f"marian-{args.size}-untrained"
    split_dir = os.path.join(args.out, name, "1")
    merged_dir = os.path.join(args.out, name + "-merged", "1")
    for d in (split_dir, merged_dir):
        if os.path.exists(d):
            shutil.rmtree(d)
        os.makedirs(d)

    d_model, enc_layers, dec_layers, heads, ffn, init_std, max_positions = SIZES[args.size]
    assert max_positions >= MAX_LENGTH, (max_positions, MAX_LENGTH)
    shape = f"{enc_layers}+{dec_layers} layers, {d_model} wide, {heads} heads, ffn {ffn}"

    work = tempfile.mkdtemp(prefix="marian-")
    try:
        tok = build_tokenizer(os.path.join(split_dir, "tokenizer.json"))
        vocab = tok.get_vocab_size()
        pad, eos = tok.token_to_id("<pad>"), tok.token_to_id("</s>")

        # ---- the PyTorch model, shaped and configured as opus-mt's Marian models are
        torch.manual_seed(SEED)
        np.random.seed(SEED)
        config = MarianConfig(
            vocab_size=vocab, decoder_vocab_size=vocab, d_model=d_model,
            encoder_layers=enc_layers, decoder_layers=dec_layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads,
            encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=max_positions,
            activation_function="swish", scale_embedding=True, static_position_embeddings=True,
            init_std=init_std,
            # Encoder and decoder share one embedding, as opus-mt's do, but the output projection
            # is its own matrix: with random weights a tied one makes the decoder echo its input
            # token forever (the post-LN residual keeps that token's embedding on top), and every
            # source then "translates" to the same repeated token.
            share_encoder_decoder_embeddings=True, tie_word_embeddings=False,
            pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad,
            forced_eos_token_id=None, bos_token_id=None,
            architectures=["MarianMTModel"])
        model = MarianMTModel(config).eval()
        model.generation_config = GenerationConfig(
            decoder_start_token_id=pad, eos_token_id=eos, pad_token_id=pad,
            bad_words_ids=None, forced_eos_token_id=None, max_length=MAX_LENGTH)
        params = sum(p.numel() for p in model.parameters())
        pt_dir = os.path.join(work, "pt")
        model.save_pretrained(pt_dir)
        saved_generation_config = json.load(open(os.path.join(pt_dir, "generation_config.json")))
        timings["build_pytorch_s"] = round(time.time() - t0, 2)

        # ---- optimum's export: post-processing (the default) merges the two decoders and keeps
        # the split pair, so one export gives all four graphs
        t = time.time()
        export_dir = os.path.join(work, "onnx")
        main_export(pt_dir, output=export_dir, task="text2text-generation-with-past",
                    device="cpu", no_post_process=False, do_validation=True)
        timings["optimum_export_s"] = round(time.time() - t, 2)
        for g in GRAPHS:
            if not os.path.exists(os.path.join(export_dir, g)):
                raise SystemExit(f"optimum did not write {g}: {sorted(os.listdir(export_dir))}")
        extra = sorted(set(os.listdir(export_dir)) - set(GRAPHS)
                       - {"config.json", "generation_config.json"})
        if extra:
            raise SystemExit(f"unexpected files in the export (external data?): {extra}")
        for g in GRAPHS:
            onnx.checker.check_model(os.path.join(export_dir, g))
        for d, graphs in ((split_dir, SPLIT_GRAPHS), (merged_dir, MERGED_GRAPHS)):
            for f in graphs + ["config.json", "generation_config.json"]:
                shutil.copy(os.path.join(export_dir, f), os.path.join(d, f))
        shutil.copy(os.path.join(split_dir, "tokenizer.json"),
                    os.path.join(merged_dir, "tokenizer.json"))

        # ---- references, three ways
        t = time.time()
        kw = generation_kwargs(pad, eos)
        pt_model = MarianMTModel.from_pretrained(pt_dir).eval()
        so = _OneThreadSessionOptions()
        ort_split = ORTModelForSeq2SeqLM.from_pretrained(
            split_dir, use_cache=True, use_merged=False, session_options=so,
            provider="CPUExecutionProvider")
        ort_merged = ORTModelForSeq2SeqLM.from_pretrained(
            merged_dir, use_cache=True, use_merged=True, session_options=so,
            provider="CPUExecutionProvider")
        assert ort_merged.decoder.is_merged and not ort_split.decoder.is_merged
        cases, matched = [], {"greedy": [], "beam": []}
        for text in SOURCES:
            src = tok.encode(text, add_special_tokens=True).ids
            assert src[-1] == eos, src
            a = hf_generate(pt_model, src, kw)
            b1 = hf_generate(ort_split, src, kw)
            b2 = hf_generate(ort_merged, src, kw)
            c1 = ort_greedy(split_dir, src, pad, eos, merged=False)
            c2 = ort_greedy(merged_dir, src, pad, eos, merged=True)
            greedy = {"transformers_pytorch": a["greedy"], "optimum_ort_split": b1["greedy"],
                      "optimum_ort_merged": b2["greedy"], "onnxruntime_loop_split": c1,
                      "onnxruntime_loop_merged": c2}
            for way, ids in greedy.items():
                if ids != a["greedy"]:
                    raise SystemExit(f"greedy mismatch for {text!r}: {way} {ids} != "
                                     f"transformers_pytorch {a['greedy']}")
            beams = {"transformers_pytorch": a, "optimum_ort_split": b1, "optimum_ort_merged": b2}
            for way, r in beams.items():
                if r["beam"] != a["beam"]:
                    raise SystemExit(f"beam mismatch for {text!r}: {way} {r['beam']} != "
                                     f"transformers_pytorch {a['beam']}")
                if abs(r["beam_score"] - a["beam_score"]) > 1e-4:
                    raise SystemExit(f"beam score mismatch for {text!r}: {way} "
                                     f"{r['beam_score']} != {a['beam_score']}")
            matched["greedy"] = sorted(greedy)
            matched["beam"] = sorted(beams)
            cases.append({
                "source": text,
                "source_ids": src,
                "greedy": {"ids": a["greedy"],
                           "text": tok.decode(a["greedy"], skip_special_tokens=True),
                           "first_step_top5": a["first_step_top5"],
                           "min_top2_logit_margin": a["min_margin"]},
                "beam": {"ids": a["beam"], "text": tok.decode(a["beam"], skip_special_tokens=True),
                         "score": a["beam_score"],
                         "score_by_way": {w: r["beam_score"] for w, r in beams.items()}},
            })
        timings["references_s"] = round(time.time() - t, 2)

        reference = {
            "model": name,
            "merged_model": name + "-merged",
            "architecture": f"MarianMTModel, {shape}, vocab {vocab}, {params} parameters, "
                            f"random weights (torch seed {SEED})",
            "versions": vers,
            "special_tokens": {"pad": pad, "eos": eos, "decoder_start": pad,
                               "source_ends_with": "</s>"},
            "generation_settings": {
                "note": "plain greedy and beam search: bad_words_ids is set to None explicitly "
                        "(opus-mt Marian generation configs carry bad_words_ids=[[pad]], which "
                        "would forbid <pad>), and forced eos, n-gram blocking, repetition penalty "
                        "and minimum length are off. ids exclude the decoder start token; "
                        "one source per call (batch 1), so nothing is padded.",
                "generation_config_json": saved_generation_config,
                "common": {k: v for k, v in kw.items()},
                "greedy": GREEDY,
                "beam": {k: v for k, v in BEAM.items()},
                "beam_score": "sequences_scores: sum of the beam's token log-probs / "
                              "(generated length ** length_penalty), length counted as "
                              "transformers does",
            },
            "matched": {
                "greedy": matched["greedy"],
                "beam": matched["beam"],
                "how": "greedy ids identical across every way; beam ids identical and "
                       "sequences_scores within 1e-4 between transformers (PyTorch) and "
                       "optimum's ORTModelForSeq2SeqLM",
                "ways": {
                    "transformers_pytorch": "MarianMTModel.generate on the saved PyTorch model",
                    "optimum_ort_split": "ORTModelForSeq2SeqLM(use_cache=True, use_merged=False): "
                                         "encoder + decoder + decoder_with_past",
                    "optimum_ort_merged": "ORTModelForSeq2SeqLM(use_merged=True): encoder + "
                                          "decoder_model_merged",
                    "onnxruntime_loop_split": "greedy loop in onnxruntime alone: decoder_model "
                                              "on the first step, decoder_with_past after",
                    "onnxruntime_loop_merged": "greedy loop in onnxruntime alone over the merged "
                                               "graph: use_cache_branch=[false] and zero-length "
                                               "past_key_values [1, heads, 0, head_dim] first",
                },
            },
            "max_new_tokens": MAX_NEW_TOKENS,
            "cases": cases,
        }
        graphs_split = describe_graphs(split_dir)
        graphs_merged = describe_graphs(merged_dir)
        version = f"optimum-onnx {vers['optimum-onnx']} (optimum {vers['optimum']})"
        for d, merged, graphs in ((split_dir, False, graphs_split), (merged_dir, True, graphs_merged)):
            with open(os.path.join(d, "graphs.txt"), "w", encoding="utf-8") as f:
                f.write(graphs)
            with open(os.path.join(d, "reference.json"), "w", encoding="utf-8") as f:
                json.dump(reference, f, indent=1)
                f.write("\n")
            # Written last: a folder without a manifest is an interrupted build.
            with open(os.path.join(d, "model.toml"), "w", encoding="utf-8") as f:
                f.write(model_toml(shape, version, merged))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    timings["total_s"] = round(time.time() - t0, 2)
    sizes = {g: os.path.getsize(os.path.join(split_dir if g in SPLIT_GRAPHS else merged_dir, g))
             for g in GRAPHS}
    print(json.dumps({"model": name, "parameters": params, "vocab": vocab, "pad": pad, "eos": eos,
                      "graph_bytes": sizes, "timings": timings, "versions": vers,
                      "matched": reference["matched"]["greedy"]}, indent=1))
    print(f"wrote {split_dir} and {merged_dir}")


if __name__ == "__main__":
    sys.exit(main())
