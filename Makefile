# Both targets create .venv and install the project (with the test extras) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.umc-installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/umc check specs/ultramem-tiny.yaml
	$(BIN)/umc compile specs/ultramem-tiny.yaml -o build/ultramem-tiny --force
	$(BIN)/umc verify build/ultramem-tiny --steps 8
	@sed -n '/^## Passes/,$$p' build/ultramem-tiny/report.md

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
