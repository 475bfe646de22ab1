# The README's two commands: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PYTEST_ARGS ?=
SETUP = RAYALIGN_VENV=$(VENV) scripts/setup.sh

.PHONY: setup demo test bench clean

setup:
	@$(SETUP)

demo: setup
	$(VENV)/bin/rayalign demo

# The browser (apt) installs while setup.sh builds .venv.
test:
	@scripts/setup-browser.sh & browser=$$!; $(SETUP) && wait $$browser
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Benchmarks (see BENCHMARKS.md); TRL goes into bench/.deps only, not into .venv.
bench: setup
	$(VENV)/bin/python -m pip install -q --target bench/.deps --no-deps trl==1.16.0 accelerate
	$(VENV)/bin/python bench/clair_generation.py
	$(VENV)/bin/python bench/clair_generation.py --model smollm2-135m-instruct --prompts 64
	$(VENV)/bin/python bench/revisers.py
	$(VENV)/bin/python bench/train_throughput.py
	$(VENV)/bin/python bench/train_packing.py
	$(VENV)/bin/python bench/packed_step_profile.py
	$(VENV)/bin/python bench/reference_pass.py
	$(VENV)/bin/python bench/serve_latency.py
	$(VENV)/bin/python bench/serve_stalls.py
	$(VENV)/bin/python bench/tables.py

clean:
	rm -rf $(VENV) runs .pytest_cache
