# Two commands set up everything on a fresh machine: `make train` and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The data: ./data (torchvision's layout: data/MNIST/raw/...) unless $LENET_DATA_DIR says otherwise, for
# training and tests alike; Fashion-MNIST for the tests in $LENET_FASHION_DIR, by default the same folder.

.PHONY: train test check lint data install test-oldest bench gpu-check gpu-data clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --no-compile -c constraints.txt -e '.[test]'
	@# byte-compiled on every core rather than by pip one file at a time (15 s sooner on 2 cores); a file
	@# written for a newer Python fails to compile here as it does under pip, which is no failure of the install
	$(PYTHON) -m compileall -q -j 0 $$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
		> /dev/null 2>&1 || true
	touch $@

install: $(VENV)/.installed

# The oldest accelerate pyproject.toml admits, in a second venv that reuses .venv's packages (torch is not
# installed twice: a .pth file puts .venv's site-packages after its own), built once and reused.
OLDEST_VENV ?= .venv-oldest
OLDEST_ACCELERATE := $(shell sed -n 's/.*"accelerate>=\([0-9.]*\).*/\1/p' pyproject.toml)
$(OLDEST_VENV)/.installed: $(VENV)/.installed
	python3 -m venv $(OLDEST_VENV)
	site=$$($(OLDEST_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	base=$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	echo "import site; site.addsitedir('$$base')" > "$$site/zz-lenet-dist-base.pth"
	$(OLDEST_VENV)/bin/python -m pip install --quiet --no-deps 'accelerate==$(OLDEST_ACCELERATE)' -e .
	printf '#!%s\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n' \
		"$(abspath $(OLDEST_VENV))/bin/python" > $(OLDEST_VENV)/bin/torchrun && chmod +x $(OLDEST_VENV)/bin/torchrun
	touch $@

# The launcher, signal and entry-point tests (and the cluster and SLURM tiers) on the oldest accelerate.
test-oldest: $(OLDEST_VENV)/.installed data
	$(OLDEST_VENV)/bin/python -m pytest -q -m "launcher or cluster or slurm"

# MNIST and Fashion-MNIST for the tests: downloaded when online, Fashion-MNIST from Debian's
# dataset-fashion-mnist package where apt-get works; a data set that cannot be had is reported, and
# the tests that need it are skipped with that reason (failed under CI=true).
data: install
	$(PYTHON) tests/provision_data.py

train: install
	$(VENV)/bin/lenet-dist train

# The suite on two workers (pytest-xdist), a whole module each (its module-scoped fixtures, the SLURM controller
# among them, made once), taken in conftest's order. OpenMP's threads sleep while they wait rather than spin:
# with libgomp's spinning, two 1-epoch runs side by side took 42-57 s on 2 cores, one after the other 31 s;
# sleeping, 25-29 s side by side.
PYTEST := OMP_WAIT_POLICY=passive $(PYTHON) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

# The full suite: real MNIST, real processes, real signals (CI runs this).
test: data
	$(PYTEST)

# The everyday tier: lint, then the in-process tests and a few short training runs.
check: install lint
	$(PYTEST) -m "not slow and not ddp and not gpu"

lint: install
	$(VENV)/bin/ruff check lenet_dist tests scripts

# On a CUDA machine, with its own Python and no venv: the staged verdict of scripts/gpu_check.py.
gpu-check:
	scripts/gpu-check

# MNIST as gzipped IDX files (~11 MB) in gpu-data/, small enough to travel with a checkout to a GPU machine
# that has no network: there, `scripts/gpu-check --data-dir gpu-data`.
gpu-data:
	mkdir -p gpu-data/MNIST/raw
	raw="$${LENET_DATA_DIR:-data}/MNIST/raw"; \
	for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do \
		if [ -f "$$raw/$$name.gz" ]; then cp "$$raw/$$name.gz" gpu-data/MNIST/raw/; \
		else gzip -c "$$raw/$$name" > gpu-data/MNIST/raw/$$name.gz; fi; done

bench: install
	$(VENV)/bin/lenet-dist bench

clean:
	rm -rf $(VENV) $(OLDEST_VENV) runs profiles/*/ .pytest_cache
