# Front door. Every target first installs what is missing (scripts/deps.sh is a no-op when all
# is there), so `make demo` and `make test` work on a fresh Debian 12 machine.
BUILD ?= build
BUILD_TYPE ?= RelWithDebInfo
PYTHON := /usr/bin/python3
BUF := tools/node_modules/.bin/buf

# The clang sanitizer trees (Debug, -O1): ASan + UBSan (also the thread-safety analysis and the fuzz
# target) and TSan. Their runtime options and suppressions: tests/sanitizers/.
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
TSA_BUILD ?= $(ASAN_BUILD)
# What the end-to-end tests run, as binaries of the ASan tree.
SAN_BINARIES := tokenbroker tokenbroker-monitor tbctl fake_upstream tb_python_stubs

FUZZ_SECONDS ?= 30

.PHONY: all deps configure build test demo lint tsa asan tsan test-asan test-tsan fuzz deploy-check bench sim clean

all: build

deps:
	@bash scripts/deps.sh $(DEPS_FLAGS)

configure: deps
	@if [ ! -f $(BUILD)/build.ninja ]; then \
	  cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) -DTB_CCACHE_RELOCATABLE=ON >/dev/null; fi

build: configure
	@cmake --build $(BUILD)

lint: deps
	@cd proto && ../$(BUF) lint && echo "buf lint: clean"

# The ASan + UBSan tree: the libraries, every unit test and the binaries the end-to-end tests run.
asan: deps
	@if [ ! -f $(ASAN_BUILD)/build.ninja ]; then \
	  CC=clang CXX=clang++ cmake -S . -B $(ASAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Debug -DTB_SANITIZE=address \
	    -DTB_CCACHE_RELOCATABLE=ON >/dev/null; fi
	@cmake --build $(ASAN_BUILD) --target unit_tests $(SAN_BINARIES)

# The TSan tree: the libraries and every unit test.
tsan: deps
	@if [ ! -f $(TSAN_BUILD)/build.ninja ]; then \
	  CC=clang CXX=clang++ cmake -S . -B $(TSAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Debug -DTB_SANITIZE=thread \
	    -DTB_CCACHE_RELOCATABLE=ON >/dev/null; fi
	@cmake --build $(TSAN_BUILD) --target unit_tests

# Clang's thread-safety analysis (-Werror=thread-safety): GUARDED_BY is checked wherever clang
# compiles our code, here in the ASan tree.
tsa: asan
	@echo "thread-safety analysis: clean"

# The unit tests under ASan + UBSan, and the end-to-end tests of the broker and monitor against
# the ASan binaries (label san_e2e, tests/CMakeLists.txt).
test-asan: asan
	@cd $(ASAN_BUILD) && ctest --output-on-failure --timeout 300 -j2 -L '^(unit|san_e2e)$$'

# The unit tests under TSan.
test-tsan: tsan
	@cd $(TSAN_BUILD) && ctest --output-on-failure --timeout 300 -j2 -L '^unit$$'

# The upstream error parser under libFuzzer (ASan + UBSan) for a bounded time, from the seed corpus.
fuzz: tsa
	@cmake --build $(TSA_BUILD) --target upstream_error_fuzz
	@work=$$(mktemp -d) && cp tests/fuzz/corpus/* $$work/ && \
	  $(TSA_BUILD)/tests/fuzz/upstream_error_fuzz -max_total_time=$(FUZZ_SECONDS) -max_len=4096 \
	    -artifact_prefix=$(TSA_BUILD)/ $$work > $(TSA_BUILD)/fuzz.log 2>&1; rc=$$?; rm -rf $$work; \
	  tail -n 3 $(TSA_BUILD)/fuzz.log; \
	  if [ $$rc -ne 0 ]; then echo "fuzz: FINDING (see $(TSA_BUILD)/fuzz.log)"; exit 1; fi; \
	  echo "fuzz: $(FUZZ_SECONDS)s of upstream_error_fuzz, no finding"

# Offline checks of what we deploy: the kustomize base and the Redis overlay rendered and validated
# (schema, namespaces, readable Secrets, no deprecated fields, our rules), and the Docker image's
# runtime packages against every shared library the shipped binaries load (ldd, dpkg -S).
IMAGE_BINARIES := tokenbroker tokenbroker-monitor tbctl
deploy-check: configure
	@node tools/validate-k8s.mjs deploy/k8s/base deploy/k8s/overlays/redis
	@cmake --build $(BUILD) --target $(IMAGE_BINARIES) >/dev/null
	@$(PYTHON) tools/check-image.py --build $(BUILD)

test: build lint tsa fuzz deploy-check
	@cd $(BUILD) && ctest --output-on-failure --timeout 300 -j2
	@$(MAKE) --no-print-directory test-asan test-tsan

# Builds only what the tour runs. DEMO_FLAGS=--keep leaves it running for you to continue by hand.
DEMO_BINARIES := tokenbroker tokenbroker-monitor tbctl fake_upstream
demo: DEPS_FLAGS = --no-npm
demo: configure
	@cmake --build $(BUILD) --target $(DEMO_BINARIES)
	@$(PYTHON) scripts/demo.py --build=$(BUILD) $(DEMO_FLAGS)

# Selection cost at 1k, 10k and 100k accounts for each policy, start-up time and memory at 100k,
# and GetToken under load against the echo server (not part of make test's timing; make test runs
# a small smoke of each).
# Every benchmark once, one table against the targets (scripts/bench_report.py); about 3 minutes.
bench: build
	@$(PYTHON) scripts/bench_report.py --build $(BUILD)

# The simulator (issue 10): a fleet of proxies against a fake Google that counts quota, through every
# configuration (naive, reactive, proactive with each policy, three replicas on Redis) at several
# demands; one table on stdout, $(BUILD)/sim/sim.{md,json,png}. About 6 minutes. `make test` runs
# its smoke (ctest sim_smoke).
sim: build
	@$(PYTHON) scripts/sim.py --build $(BUILD)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD)
