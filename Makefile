# autoglm-edge. Quick start: `make demo`, `make test`. Everything lands in .venv.
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  := models/tiny-glm4-q4_0.gguf
BENCH_MODEL := models/bench-glm4-q4_0.gguf
STAMP  := $(VENV)/.setup-done

.PHONY: setup model bench-model demo test test-fast lint bench clean dist

setup: $(STAMP)

$(STAMP): pyproject.toml deploy/setup.sh
	bash deploy/setup.sh
	touch $@

model: $(MODEL)

$(MODEL): models/build_gguf.py | $(STAMP)
	$(BIN)/python models/build_gguf.py --preset tiny --seed 0 --out $(MODEL)

bench-model: $(BENCH_MODEL)

$(BENCH_MODEL): models/build_gguf.py | $(STAMP)
	$(BIN)/python models/build_gguf.py --preset bench --seed 0 --out $(BENCH_MODEL)

demo: setup model
	$(BIN)/python deploy/demo.py

test: setup model
	$(BIN)/python -m pytest -q

test-fast: setup model
	$(BIN)/python -m pytest -q tests/unit

# The wheelhouse of a production install (deploy/install-agent.sh, deploy/install-bridge.sh).
dist: setup
	PYTHON=$(BIN)/python bash deploy/dist.sh

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache models/*.gguf dist build
