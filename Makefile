# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   CPU-sized demo of every step that exists (creates .venv, installs, fetches data)
#   make test   the test suite (creates .venv, installs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data

.PHONY: demo test test-all test-long lint paper paper-plan data venv clean-venv

# the paper at full scale (docs/scaling.md): SCHEDULER=local (default: this machine), tcp://HOST:PORT, slurm, pbs, ...;
# SCHEDULER_FILE=PATH for a cluster started with dask scheduler --scheduler-file PATH
SCHEDULER ?= local
OQMD := OQMD_Bandgap OQMD_Energy_per_atom OQMD_Formation_Enthalpy OQMD_Volume_per_atom
SCHEDULER_FILE ?=
# EPOCHS=N: every training of `make paper` stops after N epochs (all of the paper's data, a short training)
EPOCHS ?=
RUN := --data-dir $(DATA) $(if $(SCHEDULER_FILE),--scheduler-file $(SCHEDULER_FILE),--scheduler $(SCHEDULER))
TRAIN := $(RUN) $(if $(EPOCHS),--epochs $(EPOCHS))
PLAN_LOG := $(DATA)/benchmarks/plan.jsonl

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test]"
	touch $@

# fetch the published datasets into $(DATA)/ (the scripts also do this on first need)
data: venv
	$(PY) -m crabnet.fetch --data-dir $(DATA)

demo: venv
	$(PY) get_training_attention.py --quick --data-dir $(DATA)
	$(PY) generate_attention_videos.py --quick --data-dir $(DATA) --fps 3
	$(PY) guess_oxidation.py --quick --data-dir $(DATA)
	$(PY) get_crabnet_embeddings.py --quick --data-dir $(DATA)
	$(PY) plot_element_correlation.py --quick --data-dir $(DATA)
	$(PY) plot_local_edm_umap.py --quick --data-dir $(DATA)
	$(PY) plot_global_edm_umap.py --quick --data-dir $(DATA)
	$(PY) get_dataset_stats.py --quick --data-dir $(DATA)

test: venv
	$(PY) -m pytest -q

# ruff's lint and format checks (configured in pyproject.toml); .ci/run runs them before the tests
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# the longer tests that .ci/run runs after `make test`: Dask schedulers, workers, fake SLURM jobs, torchrun ranks,
# the GPU check's CPU run (several minutes)
test-long: venv
	$(PY) -m pytest -q -m "cluster or ci"

# the paper's eight steps with its settings on all of its data; `make paper-plan` first says what it costs
paper: venv
	$(PY) get_training_attention.py $(TRAIN)
	$(PY) generate_attention_videos.py --data-dir $(DATA) --dataset aflow__Egap
	$(PY) guess_oxidation.py $(RUN) --dataset all --split all --matbench
	$(PY) get_crabnet_embeddings.py $(TRAIN) --dataset all
	$(PY) plot_element_correlation.py --data-dir $(DATA)
	$(PY) plot_local_edm_umap.py $(TRAIN) --dataset OQMD_Bandgap
	$(PY) plot_global_edm_umap.py $(TRAIN) $(addprefix --dataset ,$(OQMD))
	$(PY) get_dataset_stats.py $(RUN)

# every job of `make paper` with its estimated cost (rates measured on this machine) and what is done
paper-plan: venv
	rm -f $(PLAN_LOG)
	CRABNET_PLAN_LOG=$(PLAN_LOG) $(PY) get_training_attention.py $(TRAIN) --plan
	CRABNET_PLAN_LOG=$(PLAN_LOG) $(PY) guess_oxidation.py $(RUN) --dataset all --split all --matbench --plan
	CRABNET_PLAN_LOG=$(PLAN_LOG) $(PY) get_crabnet_embeddings.py $(TRAIN) --dataset all --plan
	CRABNET_PLAN_LOG=$(PLAN_LOG) $(PY) plot_local_edm_umap.py $(TRAIN) --dataset OQMD_Bandgap --plan
	CRABNET_PLAN_LOG=$(PLAN_LOG) $(PY) plot_global_edm_umap.py $(TRAIN) $(addprefix --dataset ,$(OQMD)) --plan
	CRABNET_PLAN_LOG=$(PLAN_LOG) $(PY) get_dataset_stats.py $(RUN) --plan
	$(PY) -m crabnet.jobs.engine --plan-total $(PLAN_LOG)

# also the slow tests (real data, longer training)
test-all: venv
	$(PY) -m pytest -q -m "slow or cluster or ci or not slow"

clean-venv:
	rm -rf $(VENV)
