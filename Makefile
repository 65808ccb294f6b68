# make demo   -- set-up, then the whole default job on CPU (tiny models, synthetic data, local Ray)
# make test   -- set-up, then the test suite (CPU; GPU tests skip without CUDA)
VENV ?= .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test
setup: $(VENV)/.flythinker-installed

$(VENV)/.flythinker-installed: setup.cfg scripts/setup.sh scripts/install_wordnet.sh
	VENV=$(VENV) bash scripts/setup.sh

demo: setup
	bash launch/demo.sh

test: setup
	python -m pytest -q -ra --durations=15
