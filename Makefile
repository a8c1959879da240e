# Quick start:  make demo  |  make test   (each creates or updates .venv by itself)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.instsearch-installed
OUT    ?= demo_out

.PHONY: install demo test bench mutation clean

install: $(STAMP)

# torch/torchvision are pinned first so the resolver never swaps in another multi-GB build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/instsearch demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/search_throughput.py

# mutmut over the modules listed in pyproject.toml [tool.instsearch.mutation], each with its own
# tests; prints the kill rate per module (docs/mutation.md). MODULES="eval/metrics.py" runs one.
mutation: $(STAMP)
	$(BIN)/python tools/mutation.py --fresh $(foreach m,$(MODULES),--module $(m))

clean:
	rm -rf $(VENV) $(OUT) runs lightning_logs
