"""Fixtures: stubs generated from proto/lmserve with grpcio-tools, and the real lmserve binary on a free port."""

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "tests" / "python" / "gen"


def _generate_stubs() -> None:
    # Only lmserve's own API: tritonclient registers the KServe messages (package `inference`)
    # in the same descriptor pool, and stubs of proto/inference would collide with them.
    shutil.rmtree(GENERATED, ignore_errors=True)
    GENERATED.mkdir(parents=True)
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto" / "lmserve").rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        ["grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"-I{include}",
         f"--python_out={GENERATED}", f"--grpc_python_out={GENERATED}", *protos]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}")
    for package in (GENERATED / "lmserve", GENERATED / "lmserve" / "v1"):
        (package / "__init__.py").touch()


_generate_stubs()
sys.path.insert(0, str(GENERATED))

# tritonclient pins ml-dtypes below what onnx in this environment needs, so its test runs in an
# environment of its own (.cache/tritonclient, which `make test` builds and runs it in);
# elsewhere it is not collected.
HAS_TRITONCLIENT = importlib.util.find_spec("tritonclient") is not None
collect_ignore = [] if HAS_TRITONCLIENT else ["test_tritonclient.py"]


def pytest_report_header(config):
    if not HAS_TRITONCLIENT:
        return "test_tritonclient.py not collected: it runs in .cache/tritonclient (make test)"


def _binary() -> Path:
    explicit = os.environ.get("TEST_SERVER_BIN")
    if explicit:
        return Path(explicit)
    for profile in ("release", "debug"):
        candidate = ROOT / "target" / profile / "lmserve"
        if candidate.exists():
            return candidate
    raise RuntimeError("build lmserve first (cargo build --release) or set TEST_SERVER_BIN")


def serve(args=(), env=None):
    """Starts the real binary on a free port; yields its address once it is SERVING."""
    # No drain delay: nothing balances across these test servers.
    env = dict(os.environ, LMSERVE_LOGGING__FILTER="warn", LMSERVE_SERVER__DRAIN_DELAY_MS="0",
               **(env or {}))
    process = subprocess.Popen(
        [str(_binary()), "serve", "--grpc-addr", "127.0.0.1:0", "--no-metrics", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=None, text=True,
    )
    try:
        line = process.stdout.readline().strip()
        prefix = "lmserve listening grpc="
        assert line.startswith(prefix), f"server did not start: {line!r}"
        address = line[len(prefix):].split()[0]
        _wait_serving(address)
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def server_address():
    yield from serve()


def real_models() -> Path:
    """The repository `make real-models` builds: TEST_REAL_MODELS, else the user's cache folder."""
    explicit = os.environ.get("TEST_REAL_MODELS")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = cache / "lmserve" / "real-models" / "repository"
    if not (path / "smollm2-135m-instruct" / "1" / ".built").is_file():
        raise RuntimeError(f"the real models are not built in {path}; run `make real-models`")
    return path


@pytest.fixture(scope="session")
def real_server_address():
    # One session per model and both cores for each run: the 135M decoder is the slow part.
    yield from serve(["--repository", str(real_models())],
                     {"LMSERVE_RUNTIME__SESSIONS_PER_MODEL": "1",
                      "LMSERVE_RUNTIME__INTRA_THREADS": "2"})


def _wait_serving(address: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 120
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError("lmserve never reported SERVING")


@pytest.fixture()
def channel(server_address):
    with grpc.insecure_channel(server_address) as channel:
        yield channel
