# traversal: one command sets everything up and runs the demo (`make demo`),
# one sets everything up and runs the tests (`make test`). Both work on a fresh
# Debian 12 machine as root: they apt-get the system packages and pip-install
# the Python ones into .venv themselves.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Debian packages the lab, the TAP device and the tests need.
APT_PACKAGES := nftables iproute2 iputils-ping tcpdump procps psmisc python3-venv python3-dev gcc coturn conntrack

NAT_A ?= cone
NAT_B ?= cone
PREFIX ?=
# One-way delay of each peer's WAN link, each direction: "25ms" or "25" (empty: none).
DELAY_A ?=
DELAY_B ?=
# One-way delay between each peer and the relay instead (empty: the peer's DELAY_X).
RELAY_DELAY_A ?=
RELAY_DELAY_B ?=

.PHONY: all install system-packages test unit lint demo bench fuzz lab-up lab-down lab-status clean

all: test

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "==> installing system packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "error: installing$$missing needs root (run as root or install them yourself)"; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  if echo "$$missing" | grep -qw coturn; then \
	    echo "==> coturn is installed for interop tests only: keeping its system service stopped"; \
	    systemctl disable --now coturn.service >/dev/null 2>&1 || service coturn stop >/dev/null 2>&1 || true; \
	  fi; \
	fi

$(STAMP): setup.cfg pyproject.toml
	@$(MAKE) --no-print-directory system-packages
	@echo "==> creating virtualenv $(VENV) and installing traversal with its test extras"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Test files run in parallel, whole (a lab test file shares one lab): the lab tests mostly wait on
# timers and the network, so two workers fit two cores. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2

test: install
	@$(MAKE) --no-print-directory system-packages
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile

unit: install
	$(VENV)/bin/pytest -q -ra tests/unit

demo: install
	@$(MAKE) --no-print-directory system-packages
	$(PY) netns-lab/demo.py --nat-a $(NAT_A) --nat-b $(NAT_B)

# Coverage-guided fuzzing (atheris) of the frame decoder, the STUN decoder, the handshake and the
# config reader, FUZZ_SECONDS each, growing the corpus kept in fuzz/corpus/ (commit what it adds).
# A crash stops with the input saved as fuzz/crash-*. `make test` runs a short pass of each.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := frames stun handshake config
fuzz: install
	@for target in $(FUZZ_TARGETS); do \
	  echo "==> fuzzing $$target for $(FUZZ_SECONDS) s (log: /tmp/traversal-fuzz-$$target.log)"; \
	  $(PY) fuzz/run.py $$target fuzz/corpus/$$target -max_total_time=$(FUZZ_SECONDS) \
	    -artifact_prefix=fuzz/crash-$$target- -print_final_stats=1 >/tmp/traversal-fuzz-$$target.log 2>&1; \
	  rc=$$?; grep -E "^(Done|stat::(number_of_executed_units|new_units_added))" /tmp/traversal-fuzz-$$target.log; \
	  if [ $$rc != 0 ]; then tail -n 30 /tmp/traversal-fuzz-$$target.log; \
	    echo "error: $$target crashed; the input is in fuzz/crash-$$target-*"; exit 1; fi; \
	done

# The benchmarks (root, in the lab; about 45 minutes on 2 cores): throughput and start-up against
# wireguard-go, tinc and n2n (installed from Debian by bench/vpns.py itself; a row says so if one
# cannot be), time to direct per NAT pair with relay bytes per set-up, the relay -> direct switch
# under the seed's geography, one relay's capacity, a 10-minute soak with the direct path cut every
# 30 s (bench/soak.py), the relay under hostile clients (bench/hostile_clients.py), a 16-peer full
# mesh of every NAT profile and one where every pair can go direct (bench/mesh.py, about 3 minutes
# each); then
# bench/results.md gathers every figure.
# Plots need matplotlib (the "bench" extra). Each script also runs alone (see its --help).
BENCH_PACKAGES := iperf3
bench: install
	@$(MAKE) --no-print-directory system-packages APT_PACKAGES="$(APT_PACKAGES) $(BENCH_PACKAGES)"
	@$(PY) -c "import matplotlib" 2>/dev/null || { echo "==> installing the bench extras (matplotlib)"; \
	  $(PY) -m pip install -q -e '.[bench]'; }
	$(PY) bench/throughput.py
	$(PY) bench/time_to_direct.py
	$(PY) bench/switch.py
	$(PY) bench/relay_capacity.py
	$(PY) bench/soak.py
	$(PY) bench/hostile_clients.py
	$(PY) bench/mesh.py
	$(PY) bench/mesh.py --sites cone:4,cone:4,cone:3,fullcone,public,symseq,symseq,cone \
	  --out bench/mesh_direct.md --json bench/mesh_direct.json --png bench/mesh_direct.png
	$(PY) bench/results.py

lab-up: install
	$(PY) netns-lab/lab.py up --nat-a $(NAT_A) --nat-b $(NAT_B) $(if $(PREFIX),--prefix $(PREFIX)) \
	  $(if $(DELAY_A),--delay-a $(patsubst %ms,%,$(DELAY_A))) $(if $(DELAY_B),--delay-b $(patsubst %ms,%,$(DELAY_B))) \
	  $(if $(RELAY_DELAY_A),--relay-delay-a $(patsubst %ms,%,$(RELAY_DELAY_A))) \
	  $(if $(RELAY_DELAY_B),--relay-delay-b $(patsubst %ms,%,$(RELAY_DELAY_B)))

lab-down:
	@if [ -x $(PY) ]; then $(PY) netns-lab/lab.py down $(if $(PREFIX),--prefix $(PREFIX),--all); \
	 else $(PYTHON) netns-lab/lab.py down $(if $(PREFIX),--prefix $(PREFIX),--all); fi

lab-status:
	@$(PYTHON) netns-lab/lab.py status

clean: lab-down
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis
