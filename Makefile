# Ferry: every target installs what it needs (Debian 12, as root).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd qemu-utils \
	qemu-system-x86 fio busybox-static e2fsprogs cpio python3-venv python3-pip iproute2 \
	rpm shellcheck rsync chromium chromium-driver libvirt-daemon-system libvirt-clients \
	python3-libvirt python3-pyudev qemu-guest-agent faketime libaio1
# What packaging/build.sh needs: dpkg-buildpackage with dh-python/pybuild, rpmbuild, the
# linters, and the python3-* packages the build imports (man page, completion, checks).
PACKAGE_APT_PACKAGES := dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all \
	python3-setuptools python3-build python3-installer python3-click python3-cryptography \
	python3-hypercorn python3-msgpack python3-prometheus-client python3-trio python3-xxhash \
	python3-zstandard rpm rpmlint lintian systemd man-db
# The test suite on Debian's python3-* packages alone (make test-distro). pytest-trio is
# not packaged by Debian 12: that one test plugin comes from PyPI, into .cache/distro-py.
DISTRO_TEST_APT_PACKAGES := python3-pytest python3-pytest-timeout python3-hypothesis \
	python3-outcome python3-selenium
DISTRO_PYTEST_TRIO := pytest-trio==0.8.0
# Only the benchmarks need these (their PNG plots).
BENCH_APT_PACKAGES := python3-matplotlib
PYTEST_ARGS ?=

.PHONY: all deps apt bench-apt venv test lint unit demo bench bench-quick bench-control-plane clean package \
	lint-packaging package-apt test-distro test-distro-apt fuzz soak flap

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

package-apt:
	@missing=$$(for p in $(PACKAGE_APT_PACKAGES); do dpkg -s $$p 2>/dev/null | grep -q '^Status: install ok' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test-distro-apt:
	@missing=$$(for p in $(DISTRO_TEST_APT_PACKAGES); do dpkg -s $$p 2>/dev/null | grep -q '^Status: install ok' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --ignore-installed -e '.[test,aio]'
	touch $@

lint: deps lint-packaging
	$(VENV)/bin/ruff check agent nbd_plugin formats lab tests bench
	$(VENV)/bin/mypy

lint-packaging: apt venv
	$(VENV)/bin/ruff check packaging
	shellcheck packaging/build.sh packaging/ferry-agent debian/ferry.prerm debian/ferry.postrm \
		vagrant/provision.sh vagrant/scenario.sh .ci/run

# dist/: the .deb, the .rpm and the .src.rpm (packaging/README.md).
package: package-apt
	packaging/build.sh all dist

test: lint package-apt
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The suite on /usr/bin/python3 with Debian's python3-* packages: no venv, nothing from pip
# but the pytest-trio plugin (see DISTRO_PYTEST_TRIO). Tests import Ferry from the checkout.
test-distro: apt package-apt test-distro-apt
	test -d .cache/distro-py/pytest_trio || /usr/bin/python3 -m pip install -q --no-deps \
		--target .cache/distro-py --break-system-packages $(DISTRO_PYTEST_TRIO)
	env -u VIRTUAL_ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin PYTHONPATH=.cache/distro-py \
		/usr/bin/python3 -m pytest -p no:cacheprovider $(PYTEST_ARGS)

unit: deps
	$(VENV)/bin/pytest -m 'not guest and not slow' $(PYTEST_ARGS)

demo: deps
	$(PY) -m lab.demo

bench: deps bench-apt
	$(PY) bench/run.py
	$(PY) bench/cost_split.py

bench-quick: deps bench-apt
	$(PY) bench/run.py --quick
	$(PY) bench/cost_split.py --quick

# One benchmark alone, short: status latency under load and the agent's memory (issue 18).
bench-control-plane: deps bench-apt
	$(PY) bench/run.py --quick --only control_plane

# Nightly-style: 1,000,000 fuzz inputs over the site frames, the splitter's local wire and
# the HTTP API (FUZZ_INPUTS=N for another budget); crashes kept in tests/fuzz/crashes/.
fuzz: deps
	$(PY) tests/fuzz/run.py

# Random faults every 30-90 s under an oracle write load, bounded: SOAK_MINUTES (default 30).
soak: deps
	$(PY) bench/soak.py

# The link cut and restored every 1-5 s for FLAP_MINUTES (default 5) under two writers.
flap: deps
	$(PY) bench/flap.py

clean:
	rm -rf $(VENV) .cache build dist *.egg-info
