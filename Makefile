# Everything a developer and CI run. `make test` is what .ci/run calls.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/daggyr/v1/*.proto)

.PHONY: run test proto check-gen lint bench clean

$(STAMP): pyproject.toml daggyr/_spawn.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

run: $(STAMP)
	$(VENV)/bin/daggyr

proto: $(STAMP)
	rm -rf gen/daggyr
	mkdir -p gen/daggyr/v1
	$(PY) -m grpc_tools.protoc -I proto \
		--python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	printf '"""Code generated from proto/daggyr/v1 by `make proto`."""\n' \
		> gen/daggyr/v1/__init__.py

# Regenerates gen/ into a scratch copy and fails when it differs.
check-gen: $(STAMP)
	rm -rf .gen-check && mkdir -p .gen-check/daggyr/v1
	$(PY) -m grpc_tools.protoc -I proto \
		--python_out=.gen-check --pyi_out=.gen-check \
		--grpc_python_out=.gen-check $(PROTOS)
	printf '"""Code generated from proto/daggyr/v1 by `make proto`."""\n' \
		> .gen-check/daggyr/v1/__init__.py
	diff -r gen/daggyr .gen-check/daggyr || \
		{ echo "gen/ is stale: run 'make proto' and commit the result"; exit 1; }
	rm -rf .gen-check

# buf lint for the proto, ruff for style, mypy --strict for the package.
lint: $(STAMP) node_modules/.installed
	npx --no-install buf lint
	$(VENV)/bin/ruff check daggyr tests $(wildcard bench)
	$(VENV)/bin/ruff format --check daggyr tests $(wildcard bench)
	$(VENV)/bin/mypy

test: $(STAMP) node_modules/.installed check-gen lint
	$(PY) -m pytest -p no:cacheprovider -ra

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) node_modules .gen-check
