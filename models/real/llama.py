"""A Llama decoder to ONNX from a GGUF file (any quantisation the gguf package reads), with
numpy and onnx only, in optimum's decoder layout with a KV cache:

  inputs   input_ids [batch, sequence], attention_mask [batch, past + sequence],
           position_ids [batch, sequence],
           past_key_values.N.key / .value [batch, kv_heads, past, head_dim]
  outputs  logits [batch, 1, vocab] (the last position's: the only one a decoder samples
           from, and computing the others was a fifth of a 64-token prefill),
           present.N.key / .value [batch, kv_heads, past + sequence, head_dim]

Weights are dequantised to float32 (and stored in float16 by `precision="float16"`, below). llama.cpp stores the query and key projections with their
rows permuted for its rotary layout; they are permuted back, so the graph applies rotary
embeddings as transformers' Llama does (rotate the two halves of each head).

`layout="shared"` writes the same model in the layout lmserve decodes fastest, where the cache
is written in place instead of concatenated (onnxruntime's GroupQueryAttention with a shared
past/present buffer):

  inputs   input_ids [batch, sequence], seqlens_k [batch] int32 (each row's tokens, cached and
           new, minus one), total_sequence_length [] int32,
           past_key_values.N.key / .value [batch, kv_heads, capacity, head_dim]
  outputs  logits [batch, 1, vocab] (each row's newest token), present.N.key / .value: the
           past buffers, bound to the same memory, with the new tokens' keys and values written
           at each row's next columns

Rows are left-aligned: a batch of prompts is right-padded, and a row's cache holds its tokens in
its first columns. Positions come from the row lengths, so there is no position_ids input.

The shared layout also runs fewer kernels a step, the same arithmetic regrouped: each norm and the
residual Add before it are one onnxruntime kernel, and a layer's seven products are four (query,
key and value packed into one, gate and up into another). In process on 2 CPU cores, a SmolLM2
decode step took a tenth less time for it (bench/RESULTS.md). The optimum layout keeps the
kernels an export from transformers has, as the baseline the plain loops run.

`precision="float16"` (shared layout only) writes the weights, the activations and the cache in
float16, which onnxruntime's GroupQueryAttention needs to run on CUDA: a float32 graph runs that
operator on the CPU there. The RMS norms compute in float32 (a square of a float16 activation
overflows above 256), and the logits are cast to float32, so the server reads the same output
type from either precision.
"""
import numpy as np
from gguf import GGUFReader, dequantize

from graph import FLOAT, FLOAT16, INT32, INT64, Graph

LAYOUTS = ("optimum", "shared")
PRECISIONS = {"float32": (FLOAT, np.float32), "float16": (FLOAT16, np.float16)}


def field(reader: GGUFReader, key: str, default=None):
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def hyperparameters(reader: GGUFReader) -> dict:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"unsupported GGUF architecture {arch!r}")
    hidden = field(reader, "llama.embedding_length")
    heads = field(reader, "llama.attention.head_count")
    return {
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "hidden_size": hidden,
        "intermediate_size": field(reader, "llama.feed_forward_length"),
        "num_hidden_layers": field(reader, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": field(reader, "llama.attention.head_count_kv", heads),
        "head_dim": hidden // heads,
        "max_position_embeddings": field(reader, "llama.context_length"),
        "rms_norm_eps": float(field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(reader, "llama.rope.freq_base", 10000.0)),
    }


def tensors(reader: GGUFReader) -> dict:
    """Every tensor dequantised to float32, in numpy's row-major order ([out, in] for weights)."""
    out = {}
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        out[tensor.name] = values.reshape([int(d) for d in reversed(tensor.shape)])
    return out


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of a query or key projection ([heads * head_dim, in])."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rms_norm(g: Graph, x: str, weight: str, eps: float, name: str, elem_type: int,
              fused: bool) -> str:
    """RMS norm in float32 (`weight` is float32) of `x`, returned as `elem_type`.

    `fused` squares with Pow, the form onnxruntime's SimplifiedLayerNormFusion matches, so the six
    nodes run as one kernel (SimplifiedLayerNormalization itself is no operator the ONNX checker
    knows). A squaring Mul, as the optimum layout keeps, stays six kernels, as the rsqrt form of a
    transformers export does: onnxruntime 1.31.1 fuses neither."""
    if elem_type != FLOAT:
        x = g.op("Cast", [x], f"{name}_in", to=FLOAT)
    if fused:
        squared = g.op("Pow", [x, g.const(2.0, np.float32)], f"{name}_sq")
    else:
        squared = g.op("Mul", [x, x], f"{name}_sq")
    mean = g.op("ReduceMean", [squared], f"{name}_mean", axes=[-1], keepdims=1)
    root = g.op("Sqrt", [g.op("Add", [mean, g.const(eps, np.float32)], f"{name}_eps")],
                f"{name}_sqrt")
    if elem_type == FLOAT:
        return g.op("Mul", [g.op("Div", [x, root], f"{name}_div"), weight], name)
    normed = g.op("Mul", [g.op("Div", [x, root], f"{name}_div"), weight], f"{name}_f32")
    return g.op("Cast", [normed], name, to=elem_type)


def _residual_norm(g: Graph, x: str, delta: str, weight: str, eps: float, name: str,
                   elem_type: int, fused: bool) -> tuple:
    """The residual stream `x` + `delta`, and its RMS norm: (normed, stream).

    `fused` in float32 writes onnxruntime's SkipSimplifiedLayerNormalization, one kernel for the
    Add and the norm."""
    if fused and elem_type == FLOAT:
        normed, _, _, stream = g.op("SkipSimplifiedLayerNormalization", [x, delta, weight], name,
                                    outputs=4, domain="com.microsoft", epsilon=eps)
        return normed, stream
    stream = g.op("Add", [x, delta], f"{name}_residual")
    return _rms_norm(g, stream, weight, eps, name, elem_type, fused), stream


def _rotate(g: Graph, x: str, cos: str, sin: str, half: int, name: str) -> str:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = [-x2, x1] over the head axis."""
    first, second = g.op("Split", [x, g.const([half, half])], f"{name}_split", outputs=2,
                         axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [second], f"{name}_neg"), first], f"{name}_rot",
                   axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], f"{name}_cos"),
                        g.op("Mul", [rotated, sin], f"{name}_sin")], name)


def build(weights: dict, hp: dict, layout: str = "optimum", precision: str = "float32") -> Graph:
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    if precision not in PRECISIONS or (layout == "optimum" and precision != "float32"):
        raise ValueError(f"precision {precision!r} is not one the {layout} layout is written in")
    elem_type, dtype = PRECISIONS[precision]
    heads, kv_heads, head_dim = hp["num_attention_heads"], hp["num_key_value_heads"], hp["head_dim"]
    g = Graph()
    input_ids = g.input("input_ids", INT64, ["batch", "sequence"])
    inv_freq = 1.0 / (hp["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.int64)
                                          .astype(np.float32) / head_dim))
    cache = "past" if layout == "optimum" else "capacity"
    if layout == "optimum":
        attention = _optimum_attention(g, input_ids, inv_freq, hp)
    else:
        attention = _shared_attention(g, input_ids, inv_freq, hp, dtype)
    pasts = []
    for i in range(hp["num_hidden_layers"]):
        pasts.append((
            g.input(f"past_key_values.{i}.key", elem_type, ["batch", kv_heads, cache, head_dim]),
            g.input(f"past_key_values.{i}.value", elem_type,
                    ["batch", kv_heads, cache, head_dim]),
        ))
    return _decoder(g, weights, hp, input_ids, pasts, attention, precision)


def _optimum_attention(g: Graph, input_ids: str, inv_freq: np.ndarray, hp: dict):
    """Rotary tables, masks and an attention block that concatenates each step's keys and
    values to the past it is fed."""
    heads, kv_heads, head_dim = hp["num_attention_heads"], hp["num_key_value_heads"], hp["head_dim"]
    hidden, group = hp["hidden_size"], hp["num_attention_heads"] // hp["num_key_value_heads"]
    attention_mask = g.input("attention_mask", INT64, ["batch", "total"])
    position_ids = g.input("position_ids", INT64, ["batch", "sequence"])

    # Rotary tables for the given positions: [batch, 1, sequence, head_dim].
    positions = g.op("Unsqueeze", [g.op("Cast", [position_ids], "positions_float", to=FLOAT),
                                   g.const([-1])], "positions_col")
    freqs = g.op("Mul", [positions, g.const(inv_freq.reshape(1, 1, -1), np.float32)], "freqs")
    angles = g.op("Concat", [freqs, freqs], "angles", axis=-1)
    cos = g.op("Unsqueeze", [g.op("Cos", [angles], "cos_raw"), g.const([1])], "cos")
    sin = g.op("Unsqueeze", [g.op("Sin", [angles], "sin_raw"), g.const([1])], "sin")

    # Causal and padding mask over [past + sequence] keys: [batch, 1, sequence, total].
    total = g.op("Gather", [g.op("Shape", [attention_mask], "mask_shape"), g.const(1)],
                 "total_length", axis=0)
    length = g.op("Gather", [g.op("Shape", [input_ids], "ids_shape"), g.const(1)],
                  "sequence_length", axis=0)
    past = g.op("Sub", [total, length], "past_length")
    query_pos = g.op("Unsqueeze", [g.op("Range", [past, total, g.const(1)], "query_range"),
                                   g.const([-1])], "query_pos")
    key_pos = g.op("Unsqueeze", [g.op("Range", [g.const(0), total, g.const(1)], "key_range"),
                                 g.const([0])], "key_pos")
    causal = g.op("LessOrEqual", [key_pos, query_pos], "causal")
    padding = g.op("Cast", [g.op("Unsqueeze", [attention_mask, g.const([1, 2])], "mask_4d")],
                   "mask_bool", to=9)  # BOOL
    allowed = g.op("And", [causal, padding], "allowed")
    mask_bias = g.op("Where", [allowed, g.const(0.0, np.float32),
                               g.const(np.finfo(np.float32).min, np.float32)], "mask_bias")

    q_shape = g.const([0, 0, heads, head_dim])
    kv_shape = g.const([0, 0, kv_heads, head_dim])
    merged_shape = g.const([0, 0, hidden])
    scale = g.const(1.0 / np.sqrt(head_dim), np.float32)
    half = head_dim // 2

    def attend(i: int, projections: list, past: tuple) -> tuple:
        """[batch, sequence, hidden] context, and the present key and value."""
        q, k, v = projections
        q = g.op("Transpose", [g.op("Reshape", [q, q_shape], f"l{i}_q_heads")], f"l{i}_q_t",
                 perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [k, kv_shape], f"l{i}_k_heads")], f"l{i}_k_t",
                 perm=[0, 2, 1, 3])
        v = g.op("Transpose", [g.op("Reshape", [v, kv_shape], f"l{i}_v_heads")], f"l{i}_v_t",
                 perm=[0, 2, 1, 3])
        q = _rotate(g, q, cos, sin, half, f"l{i}_q_rope")
        k = _rotate(g, k, cos, sin, half, f"l{i}_k_rope")
        key = g.op("Concat", [past[0], k], f"l{i}_present_key", axis=2)
        value = g.op("Concat", [past[1], v], f"l{i}_present_value", axis=2)
        if group > 1:
            # Each key/value head serves `group` query heads: [b, kv, t, d] -> [b, kv*group, t, d].
            expand = lambda t, n: g.op("Reshape", [  # noqa: E731
                g.op("Expand", [g.op("Unsqueeze", [t, g.const([2])], f"{n}_unsq"),
                                g.const([1, 1, group, 1, 1])], f"{n}_expand"),
                g.const([0, heads, -1, head_dim])], n)
            key_all, value_all = expand(key, f"l{i}_key_rep"), expand(value, f"l{i}_value_rep")
        else:
            key_all, value_all = key, value
        key_t = g.op("Transpose", [key_all], f"l{i}_key_t", perm=[0, 1, 3, 2])
        scores = g.op("Mul", [g.op("MatMul", [q, key_t], f"l{i}_qk"), scale], f"l{i}_scores")
        probs = g.op("Softmax", [g.op("Add", [scores, mask_bias], f"l{i}_masked")],
                     f"l{i}_probs", axis=-1)
        context = g.op("Transpose", [g.op("MatMul", [probs, value_all], f"l{i}_context")],
                       f"l{i}_context_t", perm=[0, 2, 1, 3])
        return g.op("Reshape", [context, merged_shape], f"l{i}_context_merged"), key, value

    def newest(x: str) -> str:
        # With left padding the last position is every row's newest token.
        return g.op("Slice", [x, g.const([-1]), g.const([np.iinfo(np.int64).max]),
                              g.const([1])], "final_last")

    return attend, newest, False


def _shared_attention(g: Graph, input_ids: str, inv_freq: np.ndarray, hp: dict, dtype):
    """GroupQueryAttention over a cache buffer bound as both past and present: rotary
    embeddings from cos/sin tables over every position, row lengths instead of masks."""
    heads, kv_heads, hidden = hp["num_attention_heads"], hp["num_key_value_heads"], hp["hidden_size"]
    seqlens_k = g.input("seqlens_k", INT32, ["batch"])
    total = g.input("total_sequence_length", INT32, [])
    angles = np.arange(hp["max_position_embeddings"], dtype=np.float32)[:, None] * inv_freq[None]
    cos = g.weight("rotary_cos", np.cos(angles).astype(dtype, copy=False))
    sin = g.weight("rotary_sin", np.sin(angles).astype(dtype, copy=False))

    def attend(i: int, projections: list, past: tuple) -> tuple:
        return g.op("GroupQueryAttention", [*projections, past[0], past[1], seqlens_k, total, cos,
                                            sin],
                    f"l{i}_attention", outputs=3, domain="com.microsoft", num_heads=heads,
                    kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
                    scale=float(1.0 / np.sqrt(hp["head_dim"])))

    def newest(x: str) -> str:
        # Right-padded prompts: row b's newest token is column seqlens_k[b]; a step has one.
        columns = g.op("Gather", [g.op("Shape", [input_ids], "ids_shape"), g.const(1)],
                       "columns", axis=0)
        column = g.op("Min", [g.op("Cast", [seqlens_k], "seqlens_k_64", to=INT64),
                              g.op("Sub", [columns, g.const(1)], "last_column")], "newest_column")
        index = g.op("Expand", [g.op("Unsqueeze", [column, g.const([1, 2])], "newest_3d"),
                                g.const([1, 1, hidden])], "newest_index")
        return g.op("GatherElements", [x, index], "final_last", axis=1)

    return attend, newest, True


def _decoder(g: Graph, weights: dict, hp: dict, input_ids: str, pasts: list, attention,
             precision: str) -> Graph:
    """The layers around the attention block, which `attention` supplies with the way to find
    each row's newest position and whether presents alias the pasts."""
    heads, kv_heads, head_dim = hp["num_attention_heads"], hp["num_key_value_heads"], hp["head_dim"]
    hidden, eps = hp["hidden_size"], hp["rms_norm_eps"]
    elem_type, dtype = PRECISIONS[precision]
    attend, newest, shared = attention
    table = weights["token_embd.weight"].astype(dtype, copy=False)
    embedding = g.weight("token_embd.weight", table)
    x = g.op("Gather", [embedding, input_ids], "embed_tokens", axis=0)
    presents = []
    residual = None  # each layer's last output, added to the stream by the next norm
    for i in range(hp["num_hidden_layers"]):
        p = f"blk.{i}"
        # Matrices in the graph's precision; norm weights stay float32, as the norms compute.
        w = lambda key, array: g.weight(f"{p}.{key}", array.astype(dtype, copy=False))  # noqa: E731
        norm = lambda key, x, name: _rms_norm(  # noqa: E731
            g, x, g.weight(f"{p}.{key}", weights[f"{p}.{key}"]), eps, name, elem_type, shared)
        add_norm = lambda key, x, delta, name: _residual_norm(  # noqa: E731
            g, x, delta, g.weight(f"{p}.{key}", weights[f"{p}.{key}"]), eps, name, elem_type,
            shared)
        if residual is None:
            normed = norm("attn_norm.weight", x, f"l{i}_attn_norm")
        else:
            normed, x = add_norm("attn_norm.weight", x, residual, f"l{i}_attn_norm")
        q_w = unpermute(weights[f"{p}.attn_q.weight"], heads)
        k_w = unpermute(weights[f"{p}.attn_k.weight"], kv_heads)
        v_w = weights[f"{p}.attn_v.weight"]
        if shared:
            # One product for the three projections, which GroupQueryAttention takes packed and
            # splits itself: two kernels fewer a layer.
            qkv_w = np.concatenate([q_w, k_w, v_w]).T
            projections = [g.op("MatMul", [normed, w("attn_qkv.weight", qkv_w)], f"l{i}_qkv"),
                           "", ""]
        else:
            projections = [g.op("MatMul", [normed, w("attn_q.weight", q_w.T)], f"l{i}_q"),
                           g.op("MatMul", [normed, w("attn_k.weight", k_w.T)], f"l{i}_k"),
                           g.op("MatMul", [normed, w("attn_v.weight", v_w.T)], f"l{i}_v")]
        context, key, value = attend(i, projections, pasts[i])
        presents.append((key, value))
        attention = g.op("MatMul", [context, w("attn_output.weight",
                                               weights[f"{p}.attn_output.weight"].T)],
                         f"l{i}_attn_out")
        normed, x = add_norm("ffn_norm.weight", x, attention, f"l{i}_ffn_norm")

        gate_w, up_w = weights[f"{p}.ffn_gate.weight"], weights[f"{p}.ffn_up.weight"]
        if shared:
            gate_up = g.op("MatMul", [normed, w("ffn_gate_up.weight",
                                                np.concatenate([gate_w, up_w]).T)],
                           f"l{i}_gate_up")
            gate, up = g.op("Split", [gate_up, g.const([len(gate_w), len(up_w)])],
                            f"l{i}_gate_up_split", outputs=2, axis=-1)
        else:
            gate = g.op("MatMul", [normed, w("ffn_gate.weight", gate_w.T)], f"l{i}_gate")
            up = g.op("MatMul", [normed, w("ffn_up.weight", up_w.T)], f"l{i}_up")
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"l{i}_sigmoid")], f"l{i}_silu")
        residual = g.op("MatMul", [g.op("Mul", [silu, up], f"l{i}_gated"),
                                   w("ffn_down.weight", weights[f"{p}.ffn_down.weight"].T)],
                        f"l{i}_down")

    x = _residual_norm(g, x, residual, g.weight("output_norm.weight",
                                                weights["output_norm.weight"]),
                       eps, "final_norm", elem_type, shared)[0]
    # Tied embeddings when the file has no output matrix: logits = x @ embedding^T, through Gemm
    # with transB so the one [vocab, hidden] table serves both ends.
    head = (g.weight("output.weight", weights["output.weight"].astype(dtype, copy=False))
            if "output.weight" in weights else embedding)
    # Only the newest position's logits: the only one a decoder samples from.
    last = newest(x)
    flat = g.op("Reshape", [last, g.const([-1, hidden])], "final_flat")
    logits_flat = g.op("Gemm", [flat, head], "lm_head", transB=1)
    if elem_type != FLOAT:
        # The server samples from float32 logits whatever the graph computes in.
        logits_flat = g.op("Cast", [logits_flat], "lm_head_f32", to=FLOAT)
    logits = g.op("Unsqueeze", [logits_flat, g.const([1])], "logits_3d")

    g.output(logits, "logits", FLOAT, ["batch", 1, hp["vocab_size"]])
    cache = "capacity" if shared else "total"
    for i, (key, value) in enumerate(presents):
        for tensor, role in ((key, "key"), (value, "value")):
            name = f"present.{i}.{role}"
            # A shared buffer must be the attention's own output: an Identity would copy it.
            if shared:
                tensor = g.rename(tensor, name)
            g.output(tensor, name, elem_type, ["batch", kv_heads, cache, head_dim])
    return g
