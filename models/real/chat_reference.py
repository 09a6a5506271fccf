"""Writes reference/smollm2-chat.json: how transformers renders conversations with
SmolLM2-135M-Instruct's chat template (`apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)`) and the token ids of the rendered text (the tokenizer called
without special tokens, as apply_chat_template(tokenize=True) does). The server's rendering is
tested against it (tests/real_models.rs).

Needs only transformers and jinja2 (no PyTorch), in a throwaway environment:

    python3 -m venv /tmp/chatref
    /tmp/chatref/bin/pip install transformers==4.57.1 jinja2
    /tmp/chatref/bin/python models/real/chat_reference.py [MODEL_FOLDER]

MODEL_FOLDER defaults to the SmolLM2 version `make real-models` builds.
"""
import json
import os
import sys

import transformers
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "reference", "smollm2-chat.json")
DEFAULT_FOLDER = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
    "lmserve/real-models/repository/smollm2-135m-instruct/1",
)

CONVERSATIONS = {
    "user only (the template adds its default system prompt)": [
        {"role": "user", "content": "Name two planets."},
    ],
    "system and user": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What colour is the sky?"},
    ],
    "multi-turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. What do you need?"},
        {"role": "user", "content": "A number between 1 and 10."},
    ],
    "unicode": [
        {"role": "user", "content": "Traduis « été » en 日本語, s'il te plaît 🙂"},
    ],
    "surrounding whitespace": [
        {"role": "system", "content": "  Be kind.\n"},
        {"role": "user", "content": "\n\n  spaced   out \t\n"},
    ],
    "empty content": [
        {"role": "user", "content": ""},
    ],
}


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_FOLDER
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cases = []
    for name, messages in CONVERSATIONS.items():
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        # The same ids apply_chat_template(tokenize=True) gives, as a check on the above.
        direct = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True
        )
        if hasattr(direct, "keys"):
            direct = direct["input_ids"]
        assert list(direct) == ids, name
        cases.append({"name": name, "messages": messages, "text": text, "ids": ids})
    reference = {
        "model": "smollm2-135m-instruct",
        "computed_by": f"transformers {transformers.__version__} apply_chat_template"
        " (add_generation_prompt=True)",
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "cases": cases,
    }
    # One line per case keeps the file short and its diffs readable.
    lines = [json.dumps(case, ensure_ascii=False) for case in reference.pop("cases")]
    head = json.dumps(reference, ensure_ascii=False, indent=1)[:-2]
    with open(OUT, "w", encoding="utf-8") as out:
        out.write(head + ',\n "cases": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n")
    print(f"wrote {len(cases)} conversations to {OUT}")


if __name__ == "__main__":
    main()
