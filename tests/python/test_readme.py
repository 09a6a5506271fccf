"""The README's examples, run top to bottom as written against the real server: every `sh` block
of "Using it", "Translation and summarization" and "Routes and model management", with the server's address in place of
localhost:50051 (and LMSERVE_ADDR for the lmserve client commands)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, _binary, serve

SECTIONS = ["Using it", "Translation and summarization", "Routes and model management"]


def _blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", body, re.S)


def _grpcurl() -> Path | None:
    explicit = os.environ.get("TEST_GRPCURL")
    if explicit and Path(explicit).is_file():
        return Path(explicit)
    found = shutil.which("grpcurl")
    return Path(found) if found else None


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory):
    state = tmp_path_factory.mktemp("readme") / "state.json"
    yield from serve(env={"LMSERVE_STATE__PATH": str(state)})


@pytest.mark.parametrize("section", SECTIONS)
def test_the_readme_examples_run_as_written(section, readme_server):
    grpcurl = _grpcurl()
    if grpcurl is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("grpcurl is missing; `make grpcurl` builds it")
        pytest.skip("grpcurl is missing; `make grpcurl` builds it")
    blocks = _blocks(section)
    assert blocks, f"no sh blocks under {section}"
    bin_dir = ROOT / "target" / "readme-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, target in (("lmserve", _binary()), ("grpcurl", grpcurl)):
        link = bin_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LMSERVE_ADDR=readme_server)
    for block in blocks:
        script = block.replace("localhost:50051", readme_server)
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{script}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        if section == "Using it" and "lmserve generate" in script:
            assert result.stdout.startswith("To be, or not"), result.stdout
        if section.startswith("Translation"):
            # The translation alone, in Spanish: the source is not echoed.
            assert "station" not in result.stdout and "estación" in result.stdout, result.stdout
        if "routes set chat" in script:
            assert "chat  generate  tiny-gpt2@1=90,tiny-lstm@1=10  shadow tiny-transformer-lm@1 5%  api" \
                in result.stdout, result.stdout
