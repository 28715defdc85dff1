# llmspyd: build the BPF objects, the virtualenv, run, test, package.
.DELETE_ON_ERROR:
SHELL := /bin/bash

PYTHON ?= /usr/bin/python3
VENV := .venv
VPY := $(VENV)/bin/python
ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
CLANG ?= clang
BPF_CFLAGS := -g -O2 -target bpf -D__TARGET_ARCH_$(ARCH) -Wall -Wno-unused-function -I bpf
BPF_SRCS := $(wildcard bpf/*.bpf.c)
BPF_OBJS := $(patsubst bpf/%.bpf.c,llmspyd/bpf/objects/%.bpf.o,$(BPF_SRCS))
BPF_HDRS := $(wildcard bpf/*.h)
PYTEST_ARGS ?=

.PHONY: all deps bpf venv run test unit bench deb clean

all: bpf venv

.stamp/deps: packaging/build-deps.sh
	bash packaging/build-deps.sh
	@mkdir -p .stamp && touch $@

deps: .stamp/deps

llmspyd/bpf/objects/%.bpf.o: bpf/%.bpf.c $(BPF_HDRS) | .stamp/deps
	@mkdir -p $(dir $@)
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

bpf: $(BPF_OBJS)

$(VENV)/.stamp: pyproject.toml | .stamp/deps
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.stamp

# run the daemon in the foreground on the embedded default configuration
run: bpf venv
	$(VENV)/bin/llmspyd

unit: bpf venv
	$(VPY) -m pytest tests/unit $(PYTEST_ARGS)

test: bpf venv
	$(VPY) -m pytest tests $(PYTEST_ARGS)

bench: bpf venv
	$(VPY) -m bench

# Debian package in dist/: apt install ./dist/llmspyd_*.deb && systemctl enable --now llmspyd
deb: bpf
	bash packaging/build-deb.sh

clean:
	rm -rf llmspyd/bpf/objects build dist .stamp *.egg-info
