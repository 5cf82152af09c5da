# BitNetMCU: `make` sets everything up and runs the main job; `make test` runs the test suite.
# Both work on a fresh machine: they create .venv, install the requirements and fetch MNIST.

PYTHON ?= python3
# The CPU build of torch is installed when .venv has no torch yet; override for another build,
# or install your own torch into .venv first (it is kept).
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
# command or file:Debian package, for the C checks, the emulated firmware, the ch32fun build (newlib headers)
# and the sweep tests on a database server
APT_TOOLS := clang:clang riscv64-unknown-elf-gcc:gcc-riscv64-unknown-elf qemu-system-riscv32:qemu-system-misc \
             /usr/include/newlib/stdio.h:libnewlib-dev pg_ctlcluster:postgresql
PY := $(VENV)/bin/python
PARAMS ?= trainingparameters.yaml
DATA_STAMP := data/cache/MNIST.pt

.PHONY: all setup data train export verify ctest sim chip test test-fast bench bench-quick clean help
.DEFAULT_GOAL := all
CC ?= cc
CFLAGS ?= -std=c99 -Wall -Wextra -Wpedantic -Werror -O2

# The ch32fun SDK for the flashable image: CH32FUN=<clone>/ch32fun, else a clone beside this repository.
CH32FUN ?= $(firstword $(wildcard ../ch32fun/ch32fun ../shared/ch32fun/ch32fun))

all: verify ctest sim chip  ## main job: set up, fetch data, train, export, verify C vs Python, run the firmware emulated

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@missing=""; for tool in $(APT_TOOLS); do command -v $${tool%%:*} >/dev/null || test -e $${tool%%:*} \
		|| missing="$$missing $${tool#*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then echo "apt-get install$$missing"; \
			(apt-get install -y -q $$missing || (apt-get update -q && apt-get install -y -q $$missing)) >/dev/null; \
		else echo "error: please install the Debian packages$$missing (C compilers and the RV32 emulator)" >&2; exit 1; fi; \
	fi
	touch $@

setup: $(VENV)/.installed  ## create .venv with the requirements

$(DATA_STAMP): $(VENV)/.installed dataset.py
	$(PY) -c "import dataset; dataset.load_dataset('MNIST')"

data: $(DATA_STAMP)  ## fetch, verify and preprocess MNIST

train: $(DATA_STAMP)  ## train the model of $(PARAMS) (skipped when its checkpoint exists)
	$(PY) training.py --params $(PARAMS) --skip-existing

export: train  ## write BitNetMCU_model.h from the trained model
	$(PY) exportquant.py --params $(PARAMS)

verify: export  ## C engine vs Python reference on all 10,000 test images; writes the test-data header
	$(PY) test_inference.py --params $(PARAMS)

ctest: BitNetMCU_MNIST_test_data.h  ## build and run the host C test program
	$(PY) testdata.py check BitNetMCU_model.h BitNetMCU_MNIST_test_data.h
	mkdir -p build
	$(CC) $(CFLAGS) -I. BitNetMCU_MNIST_test.c BitNetMCU_inference.c BitNetMCU_lanes_rv32e.S -o build/BitNetMCU_MNIST_test
	build/BitNetMCU_MNIST_test

BitNetMCU_MNIST_test_data.h:
	$(MAKE) verify

sim: verify  ## the firmware on an emulated RV32EC core: all test images, instruction counts, memory fit
	$(MAKE) -C mcu sim size nomul

chip: verify  ## the image a user flashes (ch32fun), for CH32V003 and CH32V002, run on the emulated chip
	@if [ -z "$(CH32FUN)" ]; then echo "note: no ch32fun SDK found (git clone https://github.com/cnlohr/ch32fun beside \
	this repository, or CH32FUN=<clone>/ch32fun): the flashable image was not built"; else \
	for chip in CH32V003 CH32V002; do $(MAKE) -C mcu firmware chip-sim TARGET_MCU=$$chip CH32FUN=$(abspath $(CH32FUN)) \
		|| exit 1; done; fi

test: $(DATA_STAMP)  ## run the test suite (all of it)
	$(PY) -m pytest -q tests

test-fast: $(DATA_STAMP)  ## the inner loop: every test not marked slow (under a minute)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(DATA_STAMP)  ## benchmarks: training speed, verification speed, instructions per inference
	$(PY) bench/train_speed.py
	$(PY) bench/verify_speed.py
	$(PY) bench/mcu_cycles.py

bench-quick: $(DATA_STAMP)  ## every benchmark in its quick mode (seconds each)
	for b in bench/*.py; do $(PY) $$b --quick || exit 1; done

clean:  ## remove caches, builds and run logs (keeps .venv, data and modeldata)
	rm -rf runs build .pytest_cache .hypothesis
