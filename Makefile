# README's two commands: `make demo` and `make test`. Everything a fresh clone needs is installed from here, and
# every Python package comes from requirements.lock (exact versions, sha256-checked), so a fresh clone gets exactly
# what last passed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TINY   := examples/tiny
VQA    := examples/tiny-vqa
LOCK   := requirements.lock
EXTRAS := train,eval,quantize,deploy,distributed,chatops,hub,dev
PYTEST := $(PY) -m pytest
comma  := ,
UV     := $(VENV)/bin/uv

# Where the CPU build of torch comes from when the lock is refreshed: the machine's pip find-links when it has one
# (our machines keep the wheel on disk), else PyTorch's CPU index.
PIP_FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
TORCH_SOURCE   ?= $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)

.PHONY: setup system-deps demo demo-vqa tiny-vqa test test-fast test-latest lock tiny-model bench gpu-wheels gpu-check clean

setup: $(STAMP) $(TINY)/base-model/config.json

# uv installs the lock in ~30 s (pip takes ~4 min here). uv itself is bootstrapped with pip from its own hashed
# entry in the lock; `uv pip sync --require-hashes` then makes .venv exactly the lock. swiftci itself is the only
# unlocked install, built with the locked setuptools (no build isolation, so nothing unpinned is fetched for it).
$(UV):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	awk '/^uv==/{p=1} p{print; if ($$0 !~ /\\$$/) exit}' $(LOCK) > $(VENV)/uv.lock.txt
	$(PIP) install -q --require-hashes --no-deps -r $(VENV)/uv.lock.txt

# deepspeed ships only its source, whose build imports torch: it is installed after the rest, from its own hashed
# entry in the lock, without build isolation (else the build would fetch a CUDA torch), DS_BUILD_OPS=0 (its ops
# compile on first use).
$(STAMP): $(LOCK) pyproject.toml | $(UV)
	awk '/^deepspeed==/{d=1} d{print > "$(VENV)/lock-deepspeed.txt"; if ($$0 !~ /\\$$/) d=0; next} {print}' \
	  $(LOCK) > $(VENV)/lock-rest.txt
	$(UV) pip sync -q --python $(PY) --require-hashes $(TORCH_SOURCE) $(VENV)/lock-rest.txt
	DS_BUILD_OPS=0 $(UV) pip install -q --python $(PY) --require-hashes --no-deps --no-build-isolation \
	  -r $(VENV)/lock-deepspeed.txt
	$(UV) pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	$(UV) pip check -q --python $(PY)
	touch $(STAMP)

# Refresh the lock from pyproject.toml's ranges (torch held at the CPU build by constraints.txt), then reinstall.
lock: | $(UV)
	DS_BUILD_OPS=0 $(UV) pip compile pyproject.toml --extra $(subst $(comma), --extra ,$(EXTRAS)) --generate-hashes \
	  --python-version 3.11 -c constraints.txt $(TORCH_SOURCE) --no-header --quiet \
	  --no-build-isolation-package deepspeed -o $(LOCK)
	rm -f $(STAMP)
	$(MAKE) setup

tiny-model: $(TINY)/base-model/config.json

# The vision-language example: its model (from the tiny Llama and a small vision encoder) and its generated images.
tiny-vqa: $(VQA)/base-model/config.json $(VQA)/data/train.jsonl

$(VQA)/base-model/config.json: $(VQA)/build_base_model.py $(TINY)/base-model/config.json
	$(PY) $(VQA)/build_base_model.py $(VQA)/base-model

$(VQA)/data/train.jsonl: $(VQA)/make_data.py | $(STAMP)
	$(PY) $(VQA)/make_data.py $(VQA)/data

demo-vqa: setup tiny-vqa
	$(VENV)/bin/swiftci run -c $(VQA)/swiftci.yaml

$(TINY)/base-model/config.json: $(TINY)/build_base_model.py | $(STAMP)
	$(PY) $(TINY)/build_base_model.py $(TINY)/base-model

demo: setup
	$(VENV)/bin/swiftci run -c $(TINY)/swiftci.yaml

# What the image and registry tests need (Debian packages; installed when missing, as root or with sudo).
SYSTEM_TOOLS := buildah skopeo docker-registry busybox
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then as=""; elif sudo -n true 2>/dev/null; then as="sudo"; \
	  else echo "missing:$$missing — install buildah skopeo docker-registry busybox-static (Debian/Ubuntu)"; exit 1; fi; \
	  $$as apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$as apt-get install -y -qq buildah skopeo docker-registry busybox-static; \
	fi

# The full suite: what CI runs (.ci/run).
test: setup system-deps
	$(PYTEST) -q --durations=15

# The edit–test loop: no act runs, no image builds (tests marked `act` or `image`).
test-fast: setup
	$(PYTEST) -q -m "not act and not image" --durations=10

# The drift check: the newest releases pyproject.toml's ranges admit (torch held by constraints.txt), in their own
# venv, then the whole suite. Run weekly by CI; when it fails, the lock still passes and the log says what moved.
LATEST := .venv-latest
# name==version lines with names as PEP 503 normalizes them (pip freeze and the lock spell some differently)
CANONICAL := awk -F'==' '{n=tolower($$1); gsub(/[-_.]+/, "-", n); print n "==" $$2}' | sort
test-latest: system-deps $(TINY)/base-model/config.json
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade -c constraints.txt -e '.[$(subst distributed$(comma),,$(EXTRAS))]'
	DS_BUILD_OPS=0 $(LATEST)/bin/python -m pip install -q --upgrade -c constraints.txt --no-build-isolation \
	  -e '.[distributed]'
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable | grep -v "^pip==" | $(CANONICAL) > $(LATEST)/versions.txt
	grep -E '^[A-Za-z0-9]' $(LOCK) | sed 's/ .*//' | $(CANONICAL) > $(LATEST)/locked.txt
	@echo "== what moved against $(LOCK) (< locked, > newest):"; \
	  diff $(LATEST)/locked.txt $(LATEST)/versions.txt | grep '^[<>]' || echo "nothing"
	$(LATEST)/bin/python -m pytest -q --durations=15

# The GPU truth kit (tools/gpu_check.py). `gpu-wheels` downloads here, from the lock's versions, the wheels a lent GPU
# machine lacks (it has torch, transformers, peft, accelerate, click, pyyaml, requests, matplotlib; not pydantic)
# for its Python 3.12 on x86-64, into tools/gpu-wheels/ (~3 MB, git-ignored: carry it with the device call).
GPU_WHEELS := pydantic pydantic-core annotated-types typing-inspection typing-extensions
gpu-wheels: $(STAMP)
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
	  --platform manylinux_2_17_x86_64 -d tools/gpu-wheels \
	  $(foreach p,$(GPU_WHEELS),$(shell grep -E '^$(p)==' $(LOCK) | sed 's/ .*//'))

# On the GPU machine (its own Python, no venv): measures and writes gpu_check.{json,md} to $$OUT.
gpu-check:
	python3 tools/gpu_check.py

bench: setup
	$(PY) tools/bench_table.py --out $(TINY)/out/bench.md

clean:
	rm -rf $(VENV) $(LATEST) $(TINY)/base-model $(TINY)/out .pytest_cache
