# The README's two commands: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup:
	@RAYALIGN_VENV=$(VENV) scripts/setup.sh

demo: setup
	$(VENV)/bin/rayalign demo

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
