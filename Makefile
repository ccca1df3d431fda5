# esolm: set up, run the embedded study, test. CPU machines get the CPU torch build
# (override for GPUs: `make setup TORCH=torch`).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
OFFLINE := DVC_NO_ANALYTICS=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 \
           PREFECT_SERVER_ANALYTICS_ENABLED=false MPLBACKEND=Agg \
           PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120

.PHONY: setup run reference plots test test-all clean

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

# The reference study (preset cpu-study, <= 2 h on 2 cores): run on a clone of the committed HEAD,
# its report copied into reports/reference/ with the command, revision and wall time (RUN.md).
REF ?= $(CURDIR)/.reference
REF_ENV := $(OFFLINE) PYTHONPATH=$(REF) PATH=$(CURDIR)/$(VENV)/bin:$$PATH
reference: setup
	rm -rf $(REF) && git clone -q $(CURDIR) $(REF)
	if [ -d data/raw ]; then mkdir -p $(REF)/data && cp -r data/raw $(REF)/data/; fi
	cd $(REF) && $(REF_ENV) esolm preset cpu-study
	cd $(REF) && start=$$(date +%s) && $(REF_ENV) dvc repro && echo $$(( $$(date +%s) - start )) > wall_s
	rm -rf reports/reference && mkdir -p reports/reference
	cp -r $(REF)/reports/report.md $(REF)/reports/index.html $(REF)/reports/table1.csv $(REF)/reports/figures reports/reference/
	{ echo "# How this reference study was made"; echo; \
	  echo "- command: \`make reference\` (preset cpu-study; \`esolm preset cpu-study\` then \`dvc repro\` on a clone)"; \
	  echo "- git revision: $$(git -C $(REF) rev-parse HEAD)"; \
	  echo "- wall time of dvc repro: $$(cat $(REF)/wall_s) s"; \
	  echo "- machine: $$(nproc) CPU cores, $$(uname -sm), torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	  echo "- finished: $$(date -u +%Y-%m-%dT%H:%MZ)"; } > reports/reference/RUN.md
	@cat reports/reference/RUN.md

# `dvc plots show` as a page that draws offline: the vega bundles pinned (sha512) in
# web/package-lock.json, installed without scripts, inlined into the template (esolm/plots_html.py).
PLOTS_TEMPLATE := .dvc/tmp/plots-offline.html
plots: setup web/node_modules/.package-lock.json
	$(OFFLINE) $(PY) -m esolm.plots_html --out $(PLOTS_TEMPLATE)
	$(OFFLINE) $(VENV)/bin/dvc plots show --html-template $(PLOTS_TEMPLATE) -o reports/plots
	@echo "plots (no network needed): reports/plots/index.html"

web/node_modules/.package-lock.json: web/package.json web/package-lock.json
	cd web && npm ci --ignore-scripts --omit=optional --no-audit --no-fund
	touch $@

test: setup
	$(OFFLINE) $(PY) -m pytest -q

test-all: setup
	$(OFFLINE) $(PY) -m pytest -q -m ''

clean:
	rm -rf data/processed runs reports/*.duckdb
