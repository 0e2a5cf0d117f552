# The two set-up commands of README: `make demo` and `make test`.
# Both work on a fresh Debian machine with Go; `make deps` installs the real
# QEMU tools the tests talk to (as root, with apt-get).

GO ?= go
APT_PACKAGES = qemu-utils qemu-system-x86 qemu-block-extra libnbd-bin cryptsetup-bin

.PHONY: demo test deps check unit fuzz build

build:
	$(GO) build -o bin/blockbackend ./cmd/blockbackend

demo:
	$(GO) run ./cmd/blockbackend demo

deps:
	@missing=""; for t in qemu-img qemu-io qemu-storage-daemon qemu-system-x86_64 nbdinfo cryptsetup; do \
		command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing QEMU tools (missing:$$missing)"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi
	@# The guest tests fetch a kernel and busybox with apt-get download
	@# (tests/guest), which needs the package lists.
	@if ! apt-cache show busybox-static >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq; \
	fi

check:
	@bad=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$bad" ]; then echo "gofmt would change: $$bad"; exit 1; fi
	$(GO) vet ./...

# The whole suite: unit tests, fuzz seeds, end-to-end tests against real
# QEMU tools, all with the race detector, and the drivers' suites again on
# tmpfs. The vhost-user frontend's tests
# run twice: against qemu-storage-daemon (proving the tests) and against
# our binary.
test: deps check
	$(GO) test -race -count=1 -timeout 30m ./...
	@# On tmpfs the file driver copies through a mapping: the qcow2 and
	@# file suites once more there.
	if [ -d /dev/shm ]; then TMPDIR=/dev/shm $(GO) test -race -count=1 -timeout 10m -run 'Conformance|Crash|Mapped' ./drivers/qcow2/ ./drivers/file/; fi
	$(GO) build -race -o bin/blockbackend-race ./cmd/blockbackend
	VHOST_USER_BLK_BACKEND=$(CURDIR)/bin/blockbackend-race $(GO) test -race -count=1 -timeout 10m ./vhostuser/frontend/

# Run every fuzz target for FUZZTIME each (not part of `make test`).
FUZZTIME ?= 200000x
fuzz:
	@for pkg in $$($(GO) list ./...); do \
		for f in $$($(GO) test -list 'Fuzz.*' $$pkg | grep '^Fuzz'); do \
			echo "== $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
		done; done
