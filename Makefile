# poseidon-lite: thin wrappers around cargo. `make help` lists the targets.
.PHONY: help build run test lint doc examples ci bench install

PREFIX ?= /usr/local
DESTDIR ?=

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-10s %s\n", $$1, $$2}'

build: ## build the release binary (target/release/poseidon-lite)
	cargo build --release --locked

run: build ## run the server with its default configuration (add ARGS="--help" for settings)
	./target/release/poseidon-lite $(ARGS)

# cargo-nextest runs each test in a process of its own, in parallel; without it, cargo test
# runs the same tests (the sandbox pass: every integration test file but sandbox_*,
# network_* and image_*, which choose their executor themselves) one at a time: tests name
# their cgroups and uid ranges after their process, so threads of one process must not run
# them side by side.
NEXTEST := $(shell cargo nextest --version >/dev/null 2>&1 && echo yes)
SERVER_TESTS := $(patsubst tests/%.rs,--test %,$(filter-out tests/sandbox_% tests/network_% tests/image_%,$(wildcard tests/*.rs)))

test: ## run every test: unit, integration (once per executor; sandbox and network tests need root), doc
ifeq ($(NEXTEST),yes)
	cargo nextest run --locked --lib --bins --tests --no-fail-fast
	POSEIDON_TEST_EXECUTOR=sandbox cargo nextest run --locked --tests --no-fail-fast \
		-E 'kind(test) & not binary(/^(sandbox|network|image)_/)'
else
	@echo "cargo-nextest not found (cargo install --locked cargo-nextest): using cargo test, one test at a time"
	cargo test --locked --lib --bins --tests --no-fail-fast -- --test-threads=1
	POSEIDON_TEST_EXECUTOR=sandbox cargo test --locked --no-fail-fast $(SERVER_TESTS) -- --test-threads=1
endif
	cargo test --locked --doc

lint: ## formatting and clippy, warnings are errors
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings

doc: ## API documentation, warnings are errors
	RUSTDOCFLAGS=-Dwarnings cargo doc --locked --no-deps --document-private-items

examples: ## build the examples
	cargo build --locked --examples

ci: lint test doc examples ## everything CI checks (lint, tests, docs, examples)

bench: ## performance dashboard: release server, both executors, table + target/bench/results.json
	cargo bench --locked --bench dashboard

install: build ## install the binary, the systemd units and a configuration (PREFIX=/usr/local, DESTDIR)
	install -D -m 0755 target/release/poseidon-lite $(DESTDIR)$(PREFIX)/bin/poseidon-lite
	install -d $(DESTDIR)/etc/systemd/system
	sed 's|@BINDIR@|$(PREFIX)/bin|' contrib/systemd/poseidon-lite.service \
		> $(DESTDIR)/etc/systemd/system/poseidon-lite.service
	install -m 0644 contrib/systemd/poseidon-lite.socket $(DESTDIR)/etc/systemd/system/
	install -d -m 0700 $(DESTDIR)/etc/poseidon-lite
	test -e $(DESTDIR)/etc/poseidon-lite/config.toml || \
		install -m 0600 contrib/poseidon-lite.toml $(DESTDIR)/etc/poseidon-lite/config.toml
	@echo "then: systemctl daemon-reload && systemctl enable --now poseidon-lite.socket poseidon-lite.service"
