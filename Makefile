# `make test` installs what the tests need (Debian packages, a virtual environment), lints with ruff and runs
# the tests.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Real speech for the tests (a TTS voice, sox, LibriVox recordings with transcripts, spoken words, a game's voice
# acting) and a browser.
APT_TEST_PACKAGES := espeak-ng sox libsox-fmt-all pocketsphinx-testdata ktuberling-data chromium flight-of-the-amazon-queen apertium apertium-eng-spa
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test system-deps run

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	touch $@

system-deps:
	@missing=$$(for p in $(APT_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; \
	fi

test: system-deps $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q

run: $(VENV)/.installed
	$(PY) app.py
