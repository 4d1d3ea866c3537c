# Two commands for a newcomer: `make lab` (open the curriculum) and `make test` (run every test and notebook).
# Both create ./.venv and install what they need on first use.

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
# Offline by default: nothing here may reach a model hub. On a machine without an NVIDIA GPU the Triton kernels
# run in the Triton interpreter (TRITON_INTERPRET must be set before any kernel is defined).
HAS_GPU  := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
export HF_HUB_OFFLINE      ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MPLBACKEND ?= Agg
# The tiny world's models are fastest on one thread, and two pytest workers share a 2-core CI box.
export OMP_NUM_THREADS ?= 1
ifeq ($(HAS_GPU),)
export TRITON_INTERPRET ?= 1
endif

# pytest workers: 2 by default (CI has 2 cores). Override with `make test JOBS=1`.
JOBS     ?= 2
NB_TIMEOUT ?= 900
PYTEST   := $(PY) -m pytest

.PHONY: lab test test-unit test-notebooks test-browser install tiny-world student clean help

help:
	@echo "make lab          open the curriculum in JupyterLab (HEADLESS=1: no browser, print the URL)"
	@echo "make test         unit tests + every notebook executed with nbmake"
	@echo "make tiny-world   rebuild the tiny offline world (data, tokenizer, models) into data/"
	@echo "make student      write student copies of the notebooks (solutions removed) into student/"
	@echo "make test-browser opt-in: JupyterLab in headless Chromium, lesson 04's PPO stepper clicked (screenshot)"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else \
		"lessons_lib needs Python 3.11 or newer; this is " + sys.version.split()[0] + ": run make PYTHON=python3.11 ...")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(HEADLESS),--no-browser --ip=127.0.0.1,) \
		$(if $(filter 0,$(shell id -u)),--allow-root,) $(LAB_ARGS)

test: test-unit test-notebooks

test-unit: $(STAMP)
	$(PYTEST) tests -q -n $(JOBS) -m "not browser" $(PYTEST_ARGS)

test-notebooks: $(STAMP)
	$(PYTEST) -q -n $(JOBS) --nbmake --nbmake-kernel=python3 --nbmake-timeout=$(NB_TIMEOUT) notebooks $(PYTEST_ARGS)

test-browser: $(STAMP)
	@command -v chromium >/dev/null || { test "$$(id -u)" = 0 && apt-get install -y -q chromium; } \
		|| { echo "test-browser needs Debian's chromium: sudo apt-get install chromium"; exit 1; }
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,browser]"
	$(PYTEST) tests/test_browser.py -q -m browser $(PYTEST_ARGS)

tiny-world: $(STAMP)
	$(PY) -m lessons_lib.tiny build --force

student: $(STAMP)
	$(PY) -m lessons_lib.course student notebooks student

clean:
	rm -rf $(VENV) student .pytest_cache
