# The two set-up commands of the README:
#   make demo   create the environment and run the whole pipeline on the shapes world
#   make test   create the environment and run the test suite (make test-quick: without slow tests)
# make test first installs Debian's Chromium for the browser test (apt-get: root, or sudo);
# make test-no-browser runs everything else and installs nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch comes first, from its CPU build, and the constraints file holds it there.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: env demo test test-no-browser test-quick clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	@$(PY) -c "import torch, sys; sys.exit('a non-CPU torch was installed: ' + torch.__version__ if '+cpu' not in torch.__version__ and not torch.cuda.is_available() else 0)"
	touch $@

demo: env
	PIP_NO_INDEX=1 $(VENV)/bin/interp demo runs/demo

test: env
	sh scripts/install_browser.sh
	PIP_NO_INDEX=1 $(PY) -m pytest -q

test-no-browser: env
	PIP_NO_INDEX=1 $(PY) -m pytest -q -m "not browser"

test-quick: env
	PIP_NO_INDEX=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
