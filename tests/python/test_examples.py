"""The example clients in examples/ (Go, Node, Java) run against the real server; their output
must match what the Python client gets for the same greedy request (`make examples` builds them)."""

import json
import math
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import grpc
import pytest
from conftest import serve
from lmserve.v1 import inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

# What every example client sends (examples/*/README.md).
PROMPT = "To be, or not"
MAX_NEW_TOKENS = 16
EMBED_TEXTS = ["The cat sat on the mat.", "A dog lay on the rug."]

# language: (command without the address, the artifact its build leaves)
CLIENTS = {
    "go": ([str(EXAMPLES / "go" / "lmserve-example")], EXAMPLES / "go" / "lmserve-example"),
    "node": (["node", str(EXAMPLES / "node" / "client.js")],
             EXAMPLES / "node" / "node_modules" / ".package-lock.json"),
    "java": (["java", "-jar", str(EXAMPLES / "java" / "target" / "lmserve-example.jar")],
             EXAMPLES / "java" / "target" / "lmserve-example.jar"),
}

GENERATE_LINE = re.compile(r"^generate: text=(\".*\") finish=(\S+) served_by=(\S+)$", re.M)
VECTOR_LINE = re.compile(r"^vector\[(\d+)\]: dim=(\d+) first=\[(.*)\]$", re.M)
EMBED_LINE = re.compile(r"^embed: n=(\d+) dim=(\d+) cosine=(\S+)$", re.M)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def _command(language: str) -> list:
    """The client's command; skips when it is not built, except in CI, where that fails."""
    command, artifact = CLIENTS[language]
    if not artifact.exists():
        reason = f"{artifact.relative_to(ROOT)} is missing: run `make examples-{language}`"
        if _in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    return command


def _run(language: str, address: str) -> subprocess.CompletedProcess:
    return subprocess.run([*_command(language), address], capture_output=True, text=True,
                          encoding="utf-8", timeout=180, stdin=subprocess.DEVNULL)


def _cosine(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.fixture(scope="module")
def python_reference(server_address):
    """The same two calls through the Python client."""
    with grpc.insecure_channel(server_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        params = inference_pb2.GenerationParameters(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        messages = list(stub.GenerateStream(
            inference_pb2.GenerateRequest(model="tiny-gpt2", text=PROMPT, parameters=params), timeout=60))
        embed = stub.Embed(inference_pb2.EmbedRequest(model="tiny-encoder", texts=EMBED_TEXTS), timeout=60)
    finish = [m.finish_reason for m in messages if m.finish_reason]
    served = messages[0].served_by
    return {
        "text": "".join(m.text for m in messages),
        "finish": inference_pb2.FinishReason.Name(finish[-1]),
        "served_by": f"{served.model}@{served.version}",
        "vectors": [list(e.values) for e in embed.embeddings],
    }


@pytest.mark.parametrize("language", sorted(CLIENTS))
def test_example_client_matches_python_client(language, server_address, python_reference):
    result = _run(language, server_address)
    assert result.returncode == 0, f"{language} client failed:\n{result.stdout}\n{result.stderr}"
    out = result.stdout

    generate = GENERATE_LINE.findall(out)
    assert len(generate) == 1, out
    text, finish, served_by = generate[0]
    assert json.loads(text) == python_reference["text"]
    assert python_reference["text"], "greedy generation produced no text to compare"
    assert finish == python_reference["finish"]
    assert served_by == python_reference["served_by"] == "tiny-gpt2@1"
    # The tokens were printed as they arrived, after the prompt, before the summary line.
    assert out.startswith(PROMPT + python_reference["text"] + "\n"), out

    vectors = python_reference["vectors"]
    printed = VECTOR_LINE.findall(out)
    assert [int(i) for i, _, _ in printed] == list(range(len(EMBED_TEXTS)))
    for (_, dim, first), expected in zip(printed, vectors):
        assert int(dim) == len(expected)
        values = [float(x) for x in first.split(",")]
        assert values == pytest.approx(expected[:len(values)], abs=1e-5)
        assert len(values) == min(4, len(expected))

    embed = EMBED_LINE.findall(out)
    assert len(embed) == 1, out
    n, dim, cosine = embed[0]
    assert int(n) == len(EMBED_TEXTS)
    assert int(dim) == len(vectors[0])
    assert float(cosine) == pytest.approx(_cosine(*vectors), abs=1e-5)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("language", sorted(CLIENTS))
def test_example_client_exits_nonzero_when_nothing_listens(language):
    # Nothing listens on a port just released: the first call fails with UNAVAILABLE.
    result = _run(language, f"127.0.0.1:{_closed_port()}")
    assert result.returncode == 1
    assert re.search(r"^error: GenerateStream failed: code=UNAVAILABLE message=\S", result.stderr, re.M), \
        result.stderr
    assert "generate:" not in result.stdout


@pytest.fixture(scope="module")
def encoder_only_address(tmp_path_factory):
    """A server whose repository holds tiny-encoder alone, so tiny-gpt2 is NOT_FOUND."""
    repository = tmp_path_factory.mktemp("encoder-only")
    shutil.copytree(ROOT / "models" / "repository" / "tiny-encoder", repository / "tiny-encoder")
    yield from serve(["--repository", str(repository)])


@pytest.mark.parametrize("language", sorted(CLIENTS))
def test_example_client_prints_the_servers_status(language, encoder_only_address):
    _command(language)  # skip before asking Python for the server's message
    with grpc.insecure_channel(encoder_only_address) as channel:
        with pytest.raises(grpc.RpcError) as expected:
            list(inference_pb2_grpc.InferenceStub(channel).GenerateStream(
                inference_pb2.GenerateRequest(model="tiny-gpt2", text=PROMPT), timeout=60))
    assert expected.value.code() == grpc.StatusCode.NOT_FOUND

    result = _run(language, encoder_only_address)
    assert result.returncode == 1
    assert f"error: GenerateStream failed: code=NOT_FOUND message={expected.value.details()}\n" \
        in result.stderr, result.stderr
    assert "generate:" not in result.stdout
