# sept: `make demo` runs the whole pipeline on the demo corpus; `make test` runs every test.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

# Wait for another process's apt or dpkg lock (unattended upgrades, a second install) instead of failing.
APT_WAIT := -o DPkg::Lock::Timeout=600

.PHONY: install demo test lint browser clusters-up clusters-down clean

# A fresh install (torch and its CUDA libraries) takes about 6.5 GiB, plus room to unpack wheels.
NEED_GIB := 9

$(STAMP): pyproject.toml
	@test -d $(VENV)/lib || { avail=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  test "$$avail" -ge $(NEED_GIB) || { echo "make: installing into $(CURDIR)/$(VENV) needs about $(NEED_GIB) GiB free, only $$avail GiB left there" >&2; exit 1; }; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	# torch and torchvision first, pinned, so pip takes them from this machine's disk
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/sept demo --workdir work/demo

# The package's own code (not tests or benchmarks) for pylint's copy-paste check: 6 similar lines
# or more anywhere in it fail, and no pair is accepted.
PACKAGE_CODE := cli.py config_cli.py demo.py experiment.py errors.py io.py storage.py data index cluster training

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pylint --disable=all --enable=duplicate-code --min-similarity-lines=6 --score=n $(PACKAGE_CODE)

clusters-up:
	bash slurm/dev-cluster.sh up

# headless Chromium renders the selection report in tests/test_report.py
browser:
	command -v chromium >/dev/null || (apt-get $(APT_WAIT) update -qq && DEBIAN_FRONTEND=noninteractive apt-get $(APT_WAIT) install -y -qq chromium)

clusters-down:
	bash slurm/dev-cluster.sh down

# The Ray test cluster is started and stopped by the tests themselves (tests/conftest.py).
test: install browser clusters-up
	$(VENV)/bin/python -m pytest -q --timeout=1800 tests; status=$$?; \
	  bash slurm/dev-cluster.sh down; exit $$status

clean:
	rm -rf $(VENV) work
