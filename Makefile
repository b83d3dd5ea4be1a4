# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   CPU-sized demo of every step that exists (creates .venv, installs, fetches data)
#   make test   the test suite (creates .venv, installs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data

.PHONY: demo test test-all data venv clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

# fetch the published datasets into $(DATA)/ (the scripts also do this on first need)
data: venv
	$(PY) -m crabnet.data --data-dir $(DATA)

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

# also the slow tests (real data, longer training)
test-all: venv
	$(PY) -m pytest -q -m "slow or not slow"

clean-venv:
	rm -rf $(VENV)
