# buf lint and buf breaking for proto/ (configured in buf.yaml); included by the Makefile.
# buf is built from the Go module proxy once per version into the user's cache folder.
XDG_CACHE_HOME ?= $(HOME)/.cache
BUF_VERSION := v1.75.0
BUF := $(XDG_CACHE_HOME)/lmserve/tools/buf-$(BUF_VERSION)/buf
# Its last commit is the API's compatibility baseline; the file says how to move it.
PROTO_BASELINE := proto/BASELINE

.PHONY: buf proto-lint proto-breaking

buf: $(BUF)
$(BUF):
	$(call go-install,github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION),$(BUF))

proto-lint: $(BUF)
	$(BUF) lint

# The working tree against the baseline commit, with today's buf.yaml for both sides (a baseline
# may predate buf.yaml or lay out its modules differently). A full sha, since buf clones the
# baseline at depth 50 and finds an older commit only by its sha.
proto-breaking: $(BUF)
	@set -eu; \
	if [ "$$(git rev-parse --is-shallow-repository)" = true ]; then \
	  echo "proto-breaking: SKIPPED: this clone is shallow and may lack the baseline commit;" \
	    "run git fetch --unshallow to check" >&2; \
	  exit 0; \
	fi; \
	base=$$(git log -1 --format=%H -- $(PROTO_BASELINE)); \
	if [ -z "$$base" ] || ! git diff --quiet HEAD -- $(PROTO_BASELINE); then \
	  echo "proto-breaking: $(PROTO_BASELINE) has uncommitted changes, so its commit will be the" \
	    "new baseline; the breaking changes it accepts against $${base:-HEAD}:"; \
	  $(BUF) breaking --against ".git#ref=$${base:-HEAD}" --against-config buf.yaml || true; \
	else \
	  echo "proto-breaking: against $$base, the last commit that changed $(PROTO_BASELINE)"; \
	  $(BUF) breaking --against ".git#ref=$$base" --against-config buf.yaml; \
	fi
