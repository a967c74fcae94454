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
	mkdir -p build
	$(BIN)/umc eager specs/ultramem-tiny.yaml --steps 2 --save-weights build/ultramem-tiny.safetensors --force
	$(BIN)/umc compile specs/ultramem-tiny.yaml -o build/ultramem-tiny --weights build/ultramem-tiny.safetensors --force
	$(BIN)/umc verify build/ultramem-tiny --steps 8
	$(BIN)/umc export build/ultramem-tiny --format onnx
	$(BIN)/umc verify build/ultramem-tiny --backend onnxruntime --steps 8 | tail -n 1
	@sed -n '/^## Passes/,$$p' build/ultramem-tiny/report.md

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
