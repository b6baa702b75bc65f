# Ferry: every target installs what it needs (Debian 12, as root).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd qemu-utils \
	qemu-system-x86 fio busybox-static e2fsprogs cpio python3-venv python3-pip iproute2 \
	rpm shellcheck rsync chromium chromium-driver
# Only the benchmarks need these (their PNG plots).
BENCH_APT_PACKAGES := python3-matplotlib
PYTEST_ARGS ?=

.PHONY: all deps apt bench-apt venv test lint unit demo bench bench-quick clean package \
	lint-packaging

all: test

deps: apt venv

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p 2>/dev/null | grep -q '^Status: install ok' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

bench-apt:
	@missing=$$(for p in $(BENCH_APT_PACKAGES); do dpkg -s $$p 2>/dev/null | grep -q '^Status: install ok' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

lint: deps lint-packaging
	$(VENV)/bin/ruff check agent nbd_plugin tests bench
	$(VENV)/bin/mypy

lint-packaging: apt
	shellcheck packaging/build.sh packaging/ferry-agent packaging/deb/postinst \
		packaging/deb/prerm packaging/deb/postrm vagrant/provision.sh vagrant/scenario.sh

package: apt
	packaging/build.sh all dist

test: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

unit: deps
	$(VENV)/bin/pytest -m 'not guest and not slow' $(PYTEST_ARGS)

demo: deps
	$(PY) -m agent.lab.demo

bench: deps bench-apt
	$(PY) bench/run.py

bench-quick: deps bench-apt
	$(PY) bench/run.py --quick

clean:
	rm -rf $(VENV) .cache build dist *.egg-info
