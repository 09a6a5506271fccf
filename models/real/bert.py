"""BERT (as in transformers' BertModel) to ONNX from a safetensors file, with numpy and onnx only.

The graph has the inputs and output optimum exports for feature extraction: `input_ids`,
`attention_mask`, `token_type_ids` ([batch, sequence], int64) and `last_hidden_state` ([batch,
sequence, hidden]). Pooling and normalisation stay outside the graph, where sentence-transformers
keeps them (modules.json, 1_Pooling/config.json), for the server to apply as they say.

Inside, the dense layers run on the real tokens alone. A batch of texts of different lengths is
padded to its longest, and in optimum's export every padding position goes through every
projection and feed-forward layer (nearly all of the work) only to be masked out of attention and
pooling. Here the real tokens are gathered into one [tokens, hidden] matrix after the embeddings;
only attention, a small share of the work at sentence lengths, scatters them back into the padded
[batch, sequence] layout, and the output is scattered back once at the end, with zeros where the
padding was. The vectors are the same; a batch costs what its real tokens cost (measured on
all-MiniLM-L6-v2: 16 sentences padded by half as much again ran in 56 ms instead of 79), so the
server can batch texts of different lengths without paying for the padding.
"""
import numpy as np

from graph import FLOAT, INT64, Graph


def _dense(g: Graph, x: str, weights: dict, prefix: str, name: str) -> str:
    # torch's Linear stores [out, in]; MatMul wants [in, out].
    w = g.weight(f"{prefix}.weight", weights[f"{prefix}.weight"].T)
    b = g.weight(f"{prefix}.bias", weights[f"{prefix}.bias"])
    return g.op("Add", [g.op("MatMul", [x, w], f"{name}_matmul"), b], name)


def _layer_norm(g: Graph, x: str, weights: dict, prefix: str, eps: float, name: str) -> str:
    scale = g.weight(f"{prefix}.weight", weights[f"{prefix}.weight"])
    bias = g.weight(f"{prefix}.bias", weights[f"{prefix}.bias"])
    return g.op("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=eps)


def _gelu(g: Graph, x: str, name: str) -> str:
    # transformers' "gelu" is the exact form: 0.5 * x * (1 + erf(x / sqrt(2))).
    scaled = g.op("Div", [x, g.const(np.sqrt(2.0), np.float32)], f"{name}_scale")
    erf = g.op("Erf", [scaled], f"{name}_erf")
    one_plus = g.op("Add", [erf, g.const(1.0, np.float32)], f"{name}_add")
    half_x = g.op("Mul", [x, g.const(0.5, np.float32)], f"{name}_half")
    return g.op("Mul", [half_x, one_plus], name)


def build(weights: dict, config: dict) -> Graph:
    """The graph of a BertModel with `config` (a transformers config.json) and its weights."""
    if config.get("hidden_act", "gelu") != "gelu":
        raise SystemExit(f"unsupported hidden_act {config['hidden_act']!r}")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise SystemExit("only absolute position embeddings are supported")
    # Checkpoints saved from BertModel have no prefix; from a task model, "bert.".
    if any(name.startswith("bert.") for name in weights):
        weights = {name[5:]: value for name, value in weights.items() if name.startswith("bert.")}
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = hidden // heads
    eps = config.get("layer_norm_eps", 1e-12)

    g = Graph()
    input_ids = g.input("input_ids", INT64, ["batch", "sequence"])
    attention_mask = g.input("attention_mask", INT64, ["batch", "sequence"])
    token_type_ids = g.input("token_type_ids", INT64, ["batch", "sequence"])

    # Embeddings: words + positions 0..T-1 + segments, then LayerNorm.
    words = g.op("Gather", [g.weight("embeddings.word_embeddings.weight",
                                     weights["embeddings.word_embeddings.weight"]), input_ids],
                 "word_embeddings", axis=0)
    # Positions 0..T-1 are the first T rows of the table, sliced as transformers' export does
    # (ONNX Runtime's embedding fusion expects this form).
    input_shape = g.op("Shape", [input_ids], "input_shape")
    length = g.op("Slice", [input_shape, g.const([1]), g.const([2])], "sequence_length")
    position_embeddings = g.op(
        "Slice", [g.weight("embeddings.position_embeddings.weight",
                           weights["embeddings.position_embeddings.weight"]), g.const([0]),
                  length, g.const([0])], "position_embeddings")
    segments = g.op("Gather", [g.weight("embeddings.token_type_embeddings.weight",
                                        weights["embeddings.token_type_embeddings.weight"]),
                               token_type_ids], "token_type_embeddings", axis=0)
    x = g.op("Add", [g.op("Add", [words, position_embeddings], "embeddings_sum"), segments],
             "embeddings_sum")
    x = _layer_norm(g, x, weights, "embeddings.LayerNorm", eps, "embeddings_norm")

    # Padding keys get the most negative float added to their scores: [batch, 1, 1, keys].
    mask = g.op("Cast", [g.op("Unsqueeze", [attention_mask, g.const([1, 2])], "mask_4d")],
                "mask_float", to=FLOAT)
    inverted = g.op("Sub", [g.const(1.0, np.float32), mask], "mask_inverted")
    mask_bias = g.op("Mul", [inverted, g.const(np.finfo(np.float32).min, np.float32)],
                     "mask_bias")

    # The real tokens' places among the batch's [batch * sequence] slots: `real_rows` [tokens]
    # to gather them, `real_index` [tokens, 1] to scatter them back.
    flat_mask = g.op("Reshape", [attention_mask, g.const([-1])], "flat_mask")
    real = g.op("NonZero", [flat_mask], "real_tokens")
    real_rows = g.op("Reshape", [real, g.const([-1])], "real_rows")
    real_index = g.op("Transpose", [real], "real_index", perm=[1, 0])
    slots = g.op("Shape", [flat_mask], "slots")
    qkv_zeros = g.op("ConstantOfShape", [g.op("Concat", [slots, g.const([3 * hidden])],
                                              "qkv_slots", axis=0)], "qkv_zeros")
    hidden_zeros = g.op("ConstantOfShape", [g.op("Concat", [slots, g.const([hidden])],
                                                 "hidden_slots", axis=0)], "hidden_zeros")
    heads_shape = g.op("Concat", [input_shape, g.const([heads, head_dim])], "heads_shape", axis=0)
    x = g.op("Gather", [g.op("Reshape", [x, g.const([-1, hidden])], "embedded_slots"),
                        real_rows], "embedded_real", axis=0)

    scale = g.const(1.0 / np.sqrt(head_dim), np.float32)
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        # Query, key and value in one product, so one scatter pads all three for attention.
        qkv_weight = g.weight(f"{p}.attention.self.qkv.weight", np.concatenate(
            [weights[f"{p}.attention.self.{n}.weight"].T for n in ("query", "key", "value")],
            axis=1))
        qkv_bias = g.weight(f"{p}.attention.self.qkv.bias", np.concatenate(
            [weights[f"{p}.attention.self.{n}.bias"] for n in ("query", "key", "value")]))
        qkv = g.op("Add", [g.op("MatMul", [x, qkv_weight], f"l{i}_qkv_matmul"), qkv_bias],
                   f"l{i}_qkv")
        qkv = g.op("ScatterND", [qkv_zeros, real_index, qkv], f"l{i}_qkv_padded")
        q, k, v = g.op("Split", [qkv, g.const([hidden] * 3)], f"l{i}_qkv_split", outputs=3,
                       axis=1)
        q = g.op("Transpose", [g.op("Reshape", [q, heads_shape], f"l{i}_q_heads")],
                 f"l{i}_q_t", perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [k, heads_shape], f"l{i}_k_heads")],
                 f"l{i}_k_t", perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [v, heads_shape], f"l{i}_v_heads")],
                 f"l{i}_v_t", perm=[0, 2, 1, 3])
        scores = g.op("Mul", [g.op("MatMul", [q, k], f"l{i}_qk"), scale], f"l{i}_scores")
        probs = g.op("Softmax", [g.op("Add", [scores, mask_bias], f"l{i}_masked")],
                     f"l{i}_probs", axis=-1)
        context = g.op("Transpose", [g.op("MatMul", [probs, v], f"l{i}_context")],
                       f"l{i}_context_t", perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, g.const([-1, hidden])], f"l{i}_context_slots")
        context = g.op("Gather", [context, real_rows], f"l{i}_context_real", axis=0)
        attention = _dense(g, context, weights, f"{p}.attention.output.dense", f"l{i}_attn_out")
        x = _layer_norm(g, g.op("Add", [attention, x], f"l{i}_attn_residual"), weights,
                        f"{p}.attention.output.LayerNorm", eps, f"l{i}_attn_norm")
        inner = _gelu(g, _dense(g, x, weights, f"{p}.intermediate.dense", f"l{i}_inter"),
                      f"l{i}_gelu")
        out = _dense(g, inner, weights, f"{p}.output.dense", f"l{i}_ffn_out")
        x = _layer_norm(g, g.op("Add", [out, x], f"l{i}_ffn_residual"), weights,
                        f"{p}.output.LayerNorm", eps, f"l{i}_ffn_norm")

    x = g.op("ScatterND", [hidden_zeros, real_index, x], "hidden_padded")
    x = g.op("Reshape", [x, g.op("Concat", [input_shape, g.const([hidden])], "output_shape",
                                  axis=0)], "hidden_batch")
    g.output(x, "last_hidden_state", FLOAT, ["batch", "sequence", hidden])
    return g
