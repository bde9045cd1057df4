# README's two commands: `make demo` and `make test`. Everything a fresh clone needs is installed from here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TINY   := examples/tiny

.PHONY: setup system-deps demo test tiny-model bench clean

setup: $(STAMP) $(TINY)/base-model/config.json

# torch first, from the pinned CPU build, so nothing later pulls a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e '.[train,eval,quantize,deploy,dev]'
	touch $(STAMP)

tiny-model: $(TINY)/base-model/config.json

$(TINY)/base-model/config.json: $(TINY)/build_base_model.py | $(STAMP)
	$(PY) $(TINY)/build_base_model.py $(TINY)/base-model

demo: setup
	$(VENV)/bin/swiftci run -c $(TINY)/swiftci.yaml

# What the image and registry tests need (Debian packages; installed when missing and we are root).
SYSTEM_TOOLS := buildah skopeo docker-registry busybox
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah skopeo docker-registry busybox-static; \
	  else echo "missing:$$missing — install buildah skopeo docker-registry busybox-static (Debian/Ubuntu)"; exit 1; fi; \
	fi

test: setup system-deps
	$(PY) -m pytest -q

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(TINY)/base-model $(TINY)/out .pytest_cache
