# stargz-mount: `make demo` shows the tool at work offline, `make test` runs
# every test (root, FUSE, docker-registry, skopeo and umoci needed for the
# end-to-end ones; `make deps` installs them on Debian), `make bench`
# measures it against a full pull on a shaped link (BENCHMARKS.md).

GO ?= go

.PHONY: build demo test deps have-deps bench bench-deps clean

build:
	$(GO) build -o bin/stargz-mount .

# Builds, serves a small eStargz image from an in-process registry, mounts it,
# reads it, runs a command in it with chroot and unmounts it. Needs root.
demo:
	@command -v fusermount3 >/dev/null || $(MAKE) deps
	./scripts/demo.sh

# Installs the Debian packages the tests use if any is missing and we are root.
have-deps:
	@missing=; for c in fusermount3 docker-registry skopeo umoci runc crun podman debootstrap fuse-overlayfs newuidmap htpasswd pkill; do command -v $$c >/dev/null || missing=1; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then $(MAKE) deps; fi

# The test command CI runs. The root package's end-to-end tests drive the
# built binary in subprocesses, so -race there would only instrument the
# test's own image building; every other package runs under -race. The fuzz
# smokes count executions rather than seconds: Go 1.26's fuzz coordinator can
# fail a run whose -fuzztime duration ends mid-execution with "context
# deadline exceeded" (go.dev/issue/75804, fixed in Go 1.27).
test: have-deps
	@test -z "$$(gofmt -l $$(git ls-files '*.go' | grep -v '^third_party/'))" || { gofmt -l $$(git ls-files '*.go' | grep -v '^third_party/'); echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 30m $$($(GO) list ./... | grep -v '/stargz-mount$$')
	$(GO) test -count=1 -timeout 45m .
	$(GO) test -run XXX -fuzz '^FuzzTOC$$' -fuzztime 30000x ./reader
	$(GO) test -run XXX -fuzz '^FuzzParseTOC$$' -fuzztime 100000x ./reader
	$(GO) test -run XXX -fuzz '^FuzzTree$$' -fuzztime 100000x -fuzzminimizetime 2s ./reader
	$(GO) test -run XXX -fuzz '^FuzzDecode$$' -fuzztime 60000x ./reader
	$(GO) test -run XXX -fuzz '^FuzzStored$$' -fuzztime 30000x -fuzzminimizetime 2s ./reader
	$(GO) test -run XXX -fuzz '^FuzzOpen$$' -fuzztime 6000x -fuzzminimizetime 2s ./reader
	$(GO) test -run XXX -fuzz '^FuzzDecodeZstd$$' -fuzztime 60000x -fuzzminimizetime 2s ./reader
	$(GO) test -run XXX -fuzz '^FuzzOpenZstdChunked$$' -fuzztime 10000x -fuzzminimizetime 2s ./reader
	$(GO) test -run XXX -fuzz '^FuzzTar$$' -fuzztime 10000x -fuzzminimizetime 2s ./unpack

# Debian packages the tests use.
deps:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 docker-registry skopeo umoci runc crun podman debootstrap fuse-overlayfs uidmap apache2-utils procps

# Benchmarks on a shaped link (not part of test): regenerates BENCHMARKS.md
# and bench/results/. Needs root; takes a few minutes and most of the CPU.
BENCH_FLAGS ?= --delay 30ms --bandwidth 100MB/s --runs 3
bench:
	@missing=; for c in fusermount3 docker-registry debootstrap strace perf; do command -v $$c >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then $(MAKE) bench-deps; fi
	$(GO) run ./bench $(BENCH_FLAGS) --out bench/results

# Debian packages the benchmark uses on top of deps.
bench-deps: deps
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap strace linux-perf

clean:
	rm -rf bin
