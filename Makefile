# Quick start:   make train   (main job on the embedded default)   |   make test   (test suite)
# Both create/refresh the project-local venv (.venv) first via scripts/bootstrap.sh.
PY := .venv/bin/python
CONFIG ?= configs/synthetic_small.yaml
ARGS ?=

.PHONY: venv train test test-all bench
venv:
	@bash scripts/bootstrap.sh

train: venv
	$(PY) -m jobs.ray_train --config $(CONFIG) $(ARGS)

test: venv
	$(PY) -m pytest -q $(ARGS)

test-all: venv
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

# benchmarks (minutes each; ML-100K is read from ../shared/datasets/ml-100k), then their tables
bench: venv
	$(PY) -m bench.data_pipeline_bench
	$(PY) -m bench.quality_ml100k
	$(PY) -m bench.quality_ml100k --fused --models mf
	$(PY) -m bench.quality_ml100k --lite
	$(PY) -m bench.surprise_peers
	$(PY) -m bench.retrieval_bench
	$(PY) -m bench.cel_headroom
	$(PY) -m bench.elsa_bench
	$(PY) -m bench.compact_scale
	$(PY) -m bench.compression_bench
	$(PY) -m bench.scale_bench --sizes 10000 100000
	$(PY) -m bench.scale_bench --sizes 1000000 --methods full,oracle,cel --name scale_1e6
	$(PY) -m bench.planted_probe
	$(PY) -m bench.sharded_bench
	$(PY) -m bench.ray_bench
	$(PY) -m bench.report
