# esolm: set up, run the embedded study, test. CPU machines get the CPU torch build
# (override for GPUs: `make setup TORCH=torch`).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
OFFLINE := DVC_NO_ANALYTICS=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 \
           PREFECT_SERVER_ANALYTICS_ENABLED=false MPLBACKEND=Agg \
           PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120

.PHONY: setup run test test-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e '.[dev]'
	touch $@

run: setup
	$(OFFLINE) PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro
	@sed -n '1,14p' reports/report.md
	@echo "full report: reports/index.html; SQL: $(VENV)/bin/esolm query \"SELECT * FROM sampling\""

test: setup
	$(OFFLINE) $(PY) -m pytest -q

test-all: setup
	$(OFFLINE) $(PY) -m pytest -q -m ''

clean:
	rm -rf data/processed runs reports/*.duckdb
