# Convenience targets; the README's commands are the reference.
PY ?= python3
VENV ?= .venv

.PHONY: setup demo test test-slow clean

setup:  ## create .venv and install mrplip with its dev tools
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e '.[dev]'

demo:  ## run the embedded demo (default target `all`)
	$(VENV)/bin/snakemake --cores 2

test:
	$(VENV)/bin/pytest

test-slow:
	$(VENV)/bin/pytest -m slow

clean:
	rm -rf results logs .snakemake demo/*.tiff
