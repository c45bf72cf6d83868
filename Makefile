# Two commands for a newcomer: `make demo` and `make test`. Each runs `setup` first.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup demo test test-fast bench lint report-deps

setup: $(STAMP)
	-@$(MAKE) --no-print-directory report-deps

# Optional: headless Chromium renders the demo report and drives the web UI (Playwright, `vlpretrain serve`) in tests
# (skipped without it). Installed from Debian when missing and we are root with apt-get (about 20 s); otherwise a
# note, never a failure. Playwright uses this system Chromium: no browser is downloaded.
report-deps:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo 'installing chromium (Debian package) for the report rendering test'; \
		export DEBIAN_FRONTEND=noninteractive; \
		{ timeout 300 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
			|| { timeout 300 apt-get update -q >/dev/null 2>&1 && timeout 300 apt-get install -y -q --no-install-recommends chromium >/dev/null; }; } \
			|| echo 'note: apt-get install chromium failed; the report and web UI browser tests will be skipped'; \
	else echo 'note: chromium missing (needs root and apt-get to install); the report and web UI browser tests will be skipped'; fi

# torch first: the pinned CPU wheel. A plain `pip install torch` would pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m vlpretrain demo --out runs/demo

test: setup
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo 'no tests collected'; exit 0; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not distributed"

bench: setup
	$(PY) -m benchmarks

lint: setup
	$(PY) -m ruff check vlpretrain tests benchmarks
	$(PY) -m ruff format --check vlpretrain tests benchmarks
