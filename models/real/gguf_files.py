"""The Hugging Face files of a GGUF model, rebuilt from its metadata: tokenizer.json (the BPE
vocabulary, merges and special tokens llama.cpp stores), tokenizer_config.json (with the chat
template), special_tokens_map.json, config.json and generation_config.json — what an optimum
export folder holds beside model.onnx.
"""
from gguf import GGUFReader

from llama import field

# llama.cpp token types (gguf.TokenType).
CONTROL, USER_DEFINED = 3, 4

# The pre-tokenizers llama.cpp names, as tokenizers' JSON. "smollm" (StarCoder's): digits one
# by one, then GPT-2's byte-level split.
PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]},
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
              "use_regex": True},
}


def _token(reader: GGUFReader, key: str):
    index = field(reader, key)
    return None if index is None else field(reader, "tokenizer.ggml.tokens")[index]


def tokenizer_json(reader: GGUFReader) -> dict:
    model = field(reader, "tokenizer.ggml.model")
    pre = field(reader, "tokenizer.ggml.pre", "gpt-2")
    if model != "gpt2" or pre not in PRE_TOKENIZERS:
        raise SystemExit(f"unsupported GGUF tokenizer {model!r} with pre-tokenizer {pre!r}")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    added = [
        {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": kind == CONTROL}
        for i, (token, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)
    ]
    bos_added = bool(field(reader, "tokenizer.ggml.add_bos_token", False))
    if bos_added:
        bos = _token(reader, "tokenizer.ggml.bos_token_id")
        bos_id = field(reader, "tokenizer.ggml.bos_token_id")
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    else:
        post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {token: i for i, token in enumerate(tokens)}, "merges": list(merges)},
    }


def hf_files(reader: GGUFReader, hp: dict) -> dict:
    """File name -> JSON object, for every Hugging Face file but tokenizer.json."""
    ids = {role: field(reader, f"tokenizer.ggml.{role}_token_id")
           for role in ("bos", "eos", "padding", "unknown")}
    names = {role: _token(reader, f"tokenizer.ggml.{role}_token_id")
             for role in ("bos", "eos", "padding", "unknown")}
    special = {key: value for key, value in (("bos_token", names["bos"]),
                                             ("eos_token", names["eos"]),
                                             ("pad_token", names["padding"]),
                                             ("unk_token", names["unknown"])) if value is not None}
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp["max_position_embeddings"],
        **special,
    }
    template = field(reader, "tokenizer.chat_template")
    if template is not None:
        tokenizer_config["chat_template"] = template
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"],
        "torch_dtype": "float32",
        **hp,
    }
    generation = {key: value for key, value in (("bos_token_id", ids["bos"]),
                                                ("eos_token_id", ids["eos"]),
                                                ("pad_token_id", ids["padding"]))
                  if value is not None}
    return {
        "config.json": config,
        "generation_config.json": generation,
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special,
    }
