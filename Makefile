# Every target that runs Python creates .venv (and installs the suite into it) if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUNS   ?= runs
SMOKE  ?=
GPUS   ?=
NPROC  ?=
ARGS   ?=
comma  := ,

.PHONY: help install demo plots results wandb-sync test test-slurm lint format bench clean reproduce-table1 reproduce-table2 reproduce-table3 reproduce-table4 reproduce-zoo reproduce-ablation reproduce-fmnist reproduce-fmnist-resnet32 figure3 gpu-check gpu-wheels

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the suite (done by every other target too)

demo: $(STAMP) ## main job: 4 methods x 3 seeds on scikit-learn digits (CPU), then results/demo/
	$(PY) -m alr.train -m experiment=demo paths.output_dir=$(RUNS)
	$(PY) -m alr.report demo --runs $(RUNS)/demo --out results/demo
	$(PY) scripts/sync_readme.py

plots: $(STAMP) ## learning curves per table cell and residual-label heatmaps from the run folders, into results/plots/
	$(PY) -m alr.report plots --runs $(RUNS) --out results/plots

results: $(STAMP) ## every table and plot the run folders allow, the reproduction status (results/status.md, README), the cells still missing
	$(PY) -m alr.report all --runs $(RUNS) --out results
	$(PY) scripts/sync_readme.py

wandb-sync: $(STAMP) ## upload the W&B runs written offline in the run folders (needs `wandb login`)
	$(PY) -m alr.wandb_sync --runs $(RUNS)

# --maxschedchunk=1: xdist hands out one test at a time, so the end-to-end tests that conftest puts first
# go to both workers in turn (by default the first quarter of the collection goes to one worker at once).
test: $(STAMP) ## run the test suite on the CPU (no GPU, no download)
	$(PY) -m pytest -n 2 --maxschedchunk=1 --durations=8

# tests/slurm/cases.py is not collected by `make test` (pytest collects test_*.py): it starts a one-node SLURM
# cluster (tests/slurm/cluster.py) in a temporary folder, as root, and stops the daemons it started at the end.
test-slurm: $(STAMP) ## the SLURM path on a real one-node cluster (root; apt-installs slurm-wlm, munge, slurmdbd, mariadb-server if missing; about 5 min)
	$(PY) -m pytest tests/slurm/cases.py -v -s

lint: $(STAMP) ## ruff lint and format check
	$(PY) -m ruff check src tests scripts bench
	$(PY) -m ruff format --check src tests scripts bench

format: $(STAMP) ## apply ruff's formatting and import order
	$(PY) -m ruff check --fix --select I src tests scripts bench
	$(PY) -m ruff format src tests scripts bench

bench: $(STAMP) ## speed benchmarks (bench/*.py; 5 to 19 minutes on a 2-core CPU) into results/bench.md and docs/speed.md
	$(PY) bench/run_all.py --out results/bench.md
	$(PY) scripts/sync_readme.py

# On a GPU node the suite's .venv may be absent (a node with PyTorch only): gpu-check then uses $(PYTHON) and
# installs nothing; its launcher names any missing package (docs/gpu-check.md).
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))

gpu-check: ## on one GPU, in under 15 min: machine, GPU tests, Table 1 end to end, speeds, GPU-hours per table (results/gpu/)
	$(GPU_PY) scripts/gpu_check.py $(ARGS)

gpu-wheels: ## save the wheels gpu-check needs beside PyTorch (Hydra, OmegaConf, antlr4, pytest and its own) into .whl/, for an offline node
	$(GPU_PY) -m pip wheel --no-deps --wheel-dir .whl 'hydra-core>=1.3,<1.4' 'omegaconf>=2.3,<2.4' 'antlr4-python3-runtime==4.9.3' \
		'pytest>=8' 'pluggy>=1.6,<2' 'iniconfig>=2' 'packaging>=24' 'pygments>=2.15' 'exceptiongroup>=1' 'tomli>=2'

clean: ## remove run folders and caches (keeps .venv and results/)
	rm -rf $(RUNS) multirun outputs wandb .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +

# SMOKE=1: the same grid, one epoch of two tiny batches per run, on the CPU, on sample files made from
# scikit-learn's digits in each data set's real format; run folders and tables go under $(RUNS)/smoke. A smoke
# run's last.pt is deleted once it finishes (Table 1's grid would keep 14 GB of weights), but a KD teacher's.
ifeq ($(SMOKE),1)
GRID_RUNS := $(RUNS)/smoke
GRID_OUT  := $(RUNS)/smoke/results
GRID_ARGS := debug=smoke dataset.data_dir=$(RUNS)/smoke/data trainer.keep_checkpoint=false
else
GRID_RUNS := $(RUNS)
GRID_OUT  := results
GRID_ARGS :=
endif

# $(call sweep,EXPERIMENT[,OVERRIDES[,PHASE]]): the experiment's Hydra multirun (OVERRIDES narrow it, e.g. to one phase;
# commas in them as $(comma)). With GPUS=0,1,... one multirun per GPU, each training the jobs of its shard (job
# number mod the GPU count), logs in $(GRID_RUNS)/EXPERIMENT[-PHASE]-shardI.log (a target's two sweeps keep both).
define sweep
$(if $(GPUS),@set -e; gpus="$(subst $(comma), ,$(GPUS))"; n=$$(echo $$gpus | wc -w); i=0; pids=""; \
	mkdir -p $(GRID_RUNS); \
	for g in $$gpus; do \
		log=$(GRID_RUNS)/$(1)$(if $(3),-$(3))-shard$$i.log; echo "shard $$i/$$n on GPU $$g: $$log"; \
		CUDA_VISIBLE_DEVICES=$$g $(PY) -m alr.train -m experiment=$(1) paths.output_dir=$(GRID_RUNS) \
			$(GRID_ARGS) $(2) shard=$$i/$$n trainer.progress=false $(ARGS) > $$log 2>&1 & pids="$$pids $$!"; i=$$((i + 1)); \
	done; \
	status=0; for p in $$pids; do wait $$p || status=1; done; exit $$status,\
$(PY) -m alr.train -m experiment=$(1) paths.output_dir=$(GRID_RUNS) $(GRID_ARGS) $(2) $(ARGS))
endef

reproduce-table1: $(STAMP) ## Table 1: 80 CIFAR runs, then results/table1.md (SMOKE=1: on the CPU in minutes; GPUS=0,1,..)
ifeq ($(SMOKE),1)
	$(PY) -m alr.data.samples --out $(RUNS)/smoke/data cifar10 cifar100
endif
	$(call sweep,table1)
	$(PY) -m alr.report table1 --runs $(GRID_RUNS)/table1 --out $(GRID_OUT)

# Table 2's smoke runs crop 64 pixels out of the sample tree's 64×80 digits (the recipe's 224 would be
# upscaling), and its 10 classes stand in for ImageNet's 1000.
ifeq ($(SMOKE),1)
TABLE2_ARGS := dataset.num_classes=10 dataset.image_size=64 dataset.resize_size=73 dataset.num_workers=1
else
TABLE2_ARGS :=
endif

reproduce-table2: $(STAMP) ## Table 2: 12 ImageNet runs, then results/table2.md (NPROC=8: each run on 8 GPUs via torchrun; GPUS=0,1,..; SMOKE=1)
ifeq ($(SMOKE),1)
	$(PY) -m alr.data.samples --out $(RUNS)/smoke/data imagenet
endif
ifneq ($(NPROC),)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m alr.train -m experiment=table2 \
		paths.output_dir=$(GRID_RUNS) $(GRID_ARGS) $(TABLE2_ARGS) $(ARGS)
else
	$(call sweep,table2,$(TABLE2_ARGS))
endif
	$(PY) -m alr.report table2 --runs $(GRID_RUNS)/table2 --out $(GRID_OUT)

# SMOKE=1 gives FastText 1,000 hash buckets instead of 250,499 (a 46 MB checkpoint, not 1.8 GB, per run).
reproduce-table3: $(STAMP) ## Table 3: 30 text runs, then results/table3.md (SMOKE=1: on the CPU in minutes; GPUS=0,1,..)
ifeq ($(SMOKE),1)
	$(PY) -m alr.data.samples --out $(RUNS)/smoke/data ag_news yahoo_answers yelp_full
	$(call sweep,table3,model=textrnn$(comma)textrcnn$(comma)charcnn$(comma)transformer,networks)
	$(call sweep,table3,model=fasttext model.buckets=1000,fasttext)
else
	$(call sweep,table3)
endif
	$(PY) -m alr.report table3 --runs $(GRID_RUNS)/table3 --out $(GRID_OUT)

# Table 4 in two sweeps: the KD teachers (the WRN-28-10 baseline seeds) to the end, then every cell (the
# teachers are found finished and skipped), so no KD run starts before its teacher, on GPUS= shards or SLURM.
reproduce-table4: $(STAMP) ## Table 4: the KD teachers, then 35 CIFAR-100 runs, then results/table4.md (SMOKE=1, GPUS=0,1,..)
ifeq ($(SMOKE),1)
	$(PY) -m alr.data.samples --out $(RUNS)/smoke/data cifar100
endif
	$(call sweep,table4,model=wrn28_10 method=baseline trainer.keep_checkpoint=true,teachers)
	$(call sweep,table4)
	$(PY) -m alr.report table4 --runs $(GRID_RUNS)/table4 --out $(GRID_OUT)

reproduce-zoo: $(STAMP) ## ALR against six later label regularizers: 100 CIFAR-100 runs, then results/zoo.md (SMOKE=1, GPUS=0,1,..)
ifeq ($(SMOKE),1)
	$(PY) -m alr.data.samples --out $(RUNS)/smoke/data cifar100
endif
	$(call sweep,zoo)
	$(PY) -m alr.report zoo --runs $(GRID_RUNS)/zoo --out $(GRID_OUT)

reproduce-ablation: $(STAMP) ## ALR's open choices one at a time: 39 CIFAR-100 runs, then results/alr_ablation.md (SMOKE=1, GPUS=0,1,..)
ifeq ($(SMOKE),1)
	$(PY) -m alr.data.samples --out $(RUNS)/smoke/data cifar100
endif
	$(call sweep,alr_ablation)
	$(PY) -m alr.report alr_ablation --runs $(GRID_RUNS)/alr_ablation --out $(GRID_OUT)

# Fashion-MNIST reads the four IDX files from FMNIST_DATA: Debian's dataset-fashion-mnist package installs them in
# /usr/share/datasets/fashion-mnist. No fallback: a missing folder stops here with what to do. Its run records,
# tables and figures are committed (results/fmnist*), so the tables regenerate without the runs. SMOKE=1 trains
# on 100 of the 200 training images the sample files hold. $(call fmnist,EXPERIMENT): its grid, then its report.
# A committed record whose run folder is missing (a fresh checkout) is copied back first, so the sweep skips the
# runs it holds: the grid goes on across checkouts and machines from what was committed.
FMNIST_DATA ?= /usr/share/datasets/fashion-mnist
define fmnist
$(if $(filter 1,$(SMOKE)),$(PY) -m alr.data.samples --out $(RUNS)/smoke/data fashion_mnist
	$(call sweep,$(1),dataset.train_subset=100),@test -d "$(FMNIST_DATA)" || { echo "error: no Fashion-MNIST folder at $(FMNIST_DATA). Install Debian's package (apt-get install dataset-fashion-mnist), or set FMNIST_DATA=<a folder holding the four IDX files>; to download them, mkdir that folder and add ARGS=dataset.download=true." >&2; exit 1; }
	@mkdir -p $(GRID_RUNS)/$(1); for r in results/$(1)/runs/*/; do [ -d "$$r" ] || continue; d=$(GRID_RUNS)/$(1)/$$(basename "$$r"); [ -e "$$d" ] || { cp -r "$$r" "$$d" && echo "restored $$d from its committed record"; }; done
	$(call sweep,$(1),dataset.data_dir=$(FMNIST_DATA)))
	$(PY) -m alr.report $(1) --runs $(GRID_RUNS)/$(1) --out $(GRID_OUT)
$(if $(filter 1,$(SMOKE)),,$(PY) scripts/sync_readme.py)
endef

reproduce-fmnist: $(STAMP) ## Fashion-MNIST benchmark on the CPU: 12 methods x 3 seeds, about 4 min a run on 2 cores, then results/fmnist.md (FMNIST_DATA=, SMOKE=1)
	$(call fmnist,fmnist)

reproduce-fmnist-resnet32: $(STAMP) ## Fashion-MNIST's first recipe: ResNet-32 on 8,000 images, 18 runs of about 3.5 min, then results/fmnist_resnet32.md (FMNIST_DATA=, SMOKE=1)
	$(call fmnist,fmnist_resnet32)

FIG3_RUN    ?= $(GRID_RUNS)/table1/cifar10-preact_resnet18-alr-s0
FIG3_EPOCHS ?=
figure3: $(STAMP) ## Figure 3: residual labels of a CIFAR-10 ALR run at several epochs (FIG3_RUN=, FIG3_EPOCHS=1,60,160,300)
	$(PY) -m alr.report figure3 --run $(FIG3_RUN) --out $(GRID_OUT)/figure3.png $(if $(FIG3_EPOCHS),--epochs $(FIG3_EPOCHS))
