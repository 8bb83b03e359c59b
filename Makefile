# Entry points for users and CI. Everything runs as root (netlink, namespaces, dockerd).
APT_PACKAGES = python3-venv iproute2 iptables docker.io containerd runc busybox-static \
               etcd-server iperf3 iputils-ping debootstrap
VENV ?= .venv
PY = $(VENV)/bin/python

.PHONY: deps apt venv run test

deps: apt venv

apt:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	fi

venv:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'

# Single host, embedded store: serves /run/docker/plugins/pyoverlay.sock.
run: deps
	$(VENV)/bin/pyoverlay serve

test: deps
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)
