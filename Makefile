# Quick start:  make demo  |  make test   (each creates or updates .venv by itself)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.instsearch-installed
OUT    ?= demo_out

.PHONY: install demo test bench clean

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

clean:
	rm -rf $(VENV) $(OUT) runs lightning_logs
