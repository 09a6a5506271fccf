# Example clients in Go, Node and Java (examples/*/README.md), included by the root Makefile
# (`include examples/examples.mk`; uses its CACHE). `make examples` builds all three and checks
# the committed Go code against proto/; tests/python/test_examples.py runs them on the server.
# Included anywhere, this file leaves the default goal alone (restored at its end).
EXAMPLES_DEFAULT_GOAL := $(.DEFAULT_GOAL)
.PHONY: examples examples-go examples-go-gen examples-go-check examples-node examples-java examples-clean

examples: examples-go examples-go-check examples-node examples-java

EXAMPLES_GO_BIN := examples/go/lmserve-example
EXAMPLES_NODE_DEPS := examples/node/node_modules/.package-lock.json
EXAMPLES_JAVA_JAR := examples/java/target/lmserve-example.jar
EXAMPLES_PROTOS := $(wildcard proto/lmserve/v1/*.proto)

# Go: go.mod/go.sum pin every module; go's build cache makes a rebuild take about a second.
examples-go:
	cd examples/go && go build -trimpath -o lmserve-example .

# The generated Go code is committed under examples/go/gen (a module at the import path the
# protos' go_package names, replaced locally), so building the client needs no protoc. These
# regenerate it and check it is current, with plugins pinned to the runtime versions in go.mod,
# built once into the cache, and the protoc the Rust build already fetched (crate
# protoc-bin-vendored, Linux x86-64; `cargo fetch` brings it, nothing is compiled).
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
EXAMPLES_GO_TOOLS := $(abspath $(CACHE))/go-tools
PROTOC_GEN_GO := $(EXAMPLES_GO_TOOLS)/protoc-gen-go-$(PROTOC_GEN_GO_VERSION)/protoc-gen-go
PROTOC_GEN_GO_GRPC := $(EXAMPLES_GO_TOOLS)/protoc-gen-go-grpc-$(PROTOC_GEN_GO_GRPC_VERSION)/protoc-gen-go-grpc
CARGO_HOME ?= $(HOME)/.cargo
EXAMPLES_FIND_PROTOC := ls -d $(CARGO_HOME)/registry/src/*/protoc-bin-vendored-linux-x86_64-*/bin/protoc 2>/dev/null | sort -V | tail -n 1

$(PROTOC_GEN_GO):
	$(call go-install,google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION),$@)
$(PROTOC_GEN_GO_GRPC):
	$(call go-install,google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION),$@)

# $(call examples-go-protoc,OUT): the Go code for every proto, in the gen module's layout.
define examples-go-protoc
	protoc=$$($(EXAMPLES_FIND_PROTOC)); \
	if [ -z "$$protoc" ]; then cargo fetch --locked && protoc=$$($(EXAMPLES_FIND_PROTOC)); fi; \
	"$$protoc" -I proto \
	  --plugin=protoc-gen-go=$(PROTOC_GEN_GO) --plugin=protoc-gen-go-grpc=$(PROTOC_GEN_GO_GRPC) \
	  --go_out=$(1) --go_opt=module=github.com/lmserve/lmserve/gen/go \
	  --go-grpc_out=$(1) --go-grpc_opt=module=github.com/lmserve/lmserve/gen/go \
	  $(EXAMPLES_PROTOS:proto/%=%)
endef

examples-go-gen: $(PROTOC_GEN_GO) $(PROTOC_GEN_GO_GRPC)
	rm -rf examples/go/gen/lmserve
	$(call examples-go-protoc,examples/go/gen)

# The version comment of protoc itself is left out of the comparison: it moves with the crate.
examples-go-check: $(PROTOC_GEN_GO) $(PROTOC_GEN_GO_GRPC)
	rm -rf $(CACHE)/go-gen-check && mkdir -p $(CACHE)/go-gen-check
	$(call examples-go-protoc,$(CACHE)/go-gen-check)
	diff -r -I '^//[[:space:]-]*protoc[[:space:]]' examples/go/gen/lmserve $(CACHE)/go-gen-check/lmserve \
	  || { echo "examples/go/gen is stale: run make examples-go-gen"; exit 1; }

# Node: no build step; the client loads proto/ at run time. npm ci installs the committed lock.
examples-node: $(EXAMPLES_NODE_DEPS)
$(EXAMPLES_NODE_DEPS): examples/node/package.json examples/node/package-lock.json
	cd examples/node && npm ci --no-audit --no-fund --loglevel=error

# Java: Maven generates the code from proto/ and shades one runnable jar. After the first
# build has filled ~/.m2, `make examples-java MVN_FLAGS='-q -B -o'` builds offline.
MVN_FLAGS ?= -q -B
examples-java: $(EXAMPLES_JAVA_JAR)
$(EXAMPLES_JAVA_JAR): examples/java/pom.xml $(shell find examples/java/src -type f 2>/dev/null) $(EXAMPLES_PROTOS)
	cd examples/java && mvn $(MVN_FLAGS) package

# What the builds leave in examples/ (the tools and module caches stay where they are).
examples-clean:
	rm -rf $(EXAMPLES_GO_BIN) examples/node/node_modules examples/java/target $(CACHE)/go-gen-check

.DEFAULT_GOAL := $(EXAMPLES_DEFAULT_GOAL)
