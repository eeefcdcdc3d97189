# The two commands the README opens with: `make demo` and `make test`.
# Both create .venv with python3 -m venv + pip when it is missing (pip, not uv: pip takes torch
# from this machine's local wheel cache).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   := data/fashion-mnist
RUN    := runs/demo
# Where the Debian package dataset-fashion-mnist puts the idx files (override with FMNIST_DIR=...).
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: demo test venv fmnist chromium shards clean bench image image-check recipe-doc suite

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,plot]'
	touch $(STAMP)

test: $(STAMP) chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Headless Chromium renders report.html in the tests (tests/test_eval_report_html.py). Installed
# from Debian when run as root with apt-get; otherwise a note, and that one test skips.
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing the Debian package chromium (for the report.html test)"; \
	  apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1) || \
	  echo "note: could not install chromium: the report.html browser test will skip"; \
	else \
	  echo "note: chromium not installed (not root): the report.html browser test will skip"; \
	fi

fmnist:
	@if ls $(FMNIST_DIR)/*idx3-ubyte* >/dev/null 2>&1; then \
	  echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing the Debian package dataset-fashion-mnist"; \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null); \
	else \
	  echo "Fashion-MNIST not found in $(FMNIST_DIR): install the Debian package dataset-fashion-mnist (as root) or set FMNIST_DIR=DIR (folder with the *-idx3-ubyte[.gz] files)"; exit 2; \
	fi

$(DATA)/train.json: | $(STAMP) fmnist
	$(BIN)/selfsup-shards torchvision:FashionMNIST:$(FMNIST_DIR) $(DATA) --split train
$(DATA)/test.json: | $(STAMP) fmnist
	$(BIN)/selfsup-shards torchvision:FashionMNIST:$(FMNIST_DIR) $(DATA) --split test

shards: $(DATA)/train.json $(DATA)/test.json

demo: shards
	rm -rf $(RUN)
	$(BIN)/selfsup-train recipes/demo_fmnist.yaml run.dir=$(RUN)
	$(BIN)/selfsup-eval all --baseline raw-pixels $(RUN)/export/backbone.safetensors \
	  --train $(DATA)/train.json --val $(DATA)/test.json \
	  --k 20 200 --out $(RUN)/eval

# The CPU transfer suite (docs/transfer-suite.md): six small tasks written by bench/cpu_suite.py
# (Fashion-MNIST, scikit-learn's digits, generated count/position/orientation/distance), then the
# demo's backbone (trained by the demo recipe if runs/demo has none) judged against raw pixels.
SUITE_DATA := data/suite

$(SUITE_DATA)/.written: bench/cpu_suite.py | $(STAMP) fmnist
	$(BIN)/python bench/cpu_suite.py --out $(SUITE_DATA) --fmnist $(FMNIST_DIR)
	touch $@

$(RUN)/export/backbone.safetensors: | shards
	$(BIN)/selfsup-train recipes/demo_fmnist.yaml run.dir=$(RUN)

suite: $(SUITE_DATA)/.written $(RUN)/export/backbone.safetensors
	$(BIN)/selfsup-eval suite suites/cpu.yaml --baseline raw-pixels $(RUN)/export/backbone.safetensors \
	  --out $(RUN)/suite

# The container image (docker, else podman), and the check that builds it, trains a tiny recipe in
# it as its non-root user and evaluates the export on the host (not part of `make test`).
image:
	launch/image.sh

image-check: $(STAMP)
	launch/image_check.sh

bench: $(STAMP)
	$(BIN)/python bench/train_step.py

clean:
	rm -rf runs/demo $(DATA) $(SUITE_DATA)

# docs/recipe.md is generated from the recipe schema (tests/test_recipe_doc.py fails when stale)
recipe-doc: $(STAMP)
	$(BIN)/selfsup-train --explain-keys > docs/recipe.md
