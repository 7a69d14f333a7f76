# weightfs: the two set-up commands are `make run` and `make test` (README.md).
SHELL    := bash
.SHELLFLAGS := -o pipefail -c
GO       ?= go
BIN      := bin/weightfs
MNT      ?= /mnt/weightfs
GOFLAGS  ?=
export CGO_CFLAGS ?= -Wno-deprecated-declarations
# The version `weightfs --version` prints: the nearest tag, else the commit ("dev" outside git).
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)

.PHONY: all build run test test-go test-python lint bench fuzz gpu-test gpu-bench deps clean

all: build

build:
	$(GO) build $(GOFLAGS) -buildvcs=auto -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/weightfs

## run: build, then serve the built-in demo model on $(MNT) in the foreground (Ctrl-C unmounts).
run: build
	mkdir -p $(MNT)
	./$(BIN) mount $(MNT) --demo

## test: everything CI runs; mounting tests need root and /dev/fuse (they skip elsewhere).
test: deps lint test-go test-python

deps:
	@command -v python3 >/dev/null || (apt-get update -qq && apt-get install -y -qq python3)
	$(GO) mod download

lint:
	@bad=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$bad" ]; then echo "gofmt would change: $$bad"; exit 1; fi
	$(GO) vet ./...

test-go:
	$(GO) test $(GOFLAGS) -count=1 -timeout 40m ./...

test-python: build
	@python3 -c 'import venv, ensurepip' 2>/dev/null || (apt-get update -qq && apt-get install -y -qq python3-venv) || echo "python3-venv unavailable: the offline install test (test_install.py) will skip"
	python3 -m unittest discover -s integration/python/tests -v

## bench: side-by-side throughput of the mount against tmpfs, and the codec against zstd (prints ratios).
bench:
	WEIGHTFS_BENCH=1 $(GO) test -count=1 -run '^TestBenchReport' -v -timeout 30m ./integration

## fuzz: run each safetensors fuzz target for FUZZTIME.
FUZZTIME ?= 60s
fuzz:
	$(GO) test -run=NONE -fuzz=FuzzParse -fuzztime=$(FUZZTIME) ./store/safetensors
	$(GO) test -run=NONE -fuzz=FuzzReadHeader -fuzztime=$(FUZZTIME) ./store/safetensors

clean:
	rm -rf bin .devbuild

## gpu-test: on a GPU machine, as root: mount a small model with --gpu 0 and check real loaders.
gpu-test: build
	python3 integration/gpu/gpu_test.py --bin $(BIN) 2>&1 | tee docs/gpu-test.log

## gpu-bench: on a GPU machine, as root: a Qwen3-8B-shaped checkpoint, loaders side by side.
gpu-bench: build
	python3 integration/gpu/gpu_bench.py --bin $(BIN)
