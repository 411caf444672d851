# quant-audit: `make demo` and `make test` each set up .venv from requirements.lock first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
QA := $(VENV)/bin/quant-audit
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs

.PHONY: demo test install system-deps clean weights

install: $(STAMP)

# Editable installs are path-based (editable_mode=compat): onnxruntime.transformers appends its own
# folder, which has a metrics.py, to sys.path, and would shadow our `metrics` package otherwise.

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps --config-settings editable_mode=compat -e .
	$(PY) -c "from metrics.fused import compile_kernels; compile_kernels()"  # numba's cache, as pip compiles .pyc
	touch $@

# The whole default audit (audit.toml): export, calibrate, quantize, regenerate, score, gates,
# report, history. A failing gate (exit 1) is a finding, not a broken demo: the verdict is printed.
demo: $(STAMP)
	@$(QA) run --out $(DEMO_OUT) $(DEMO_ARGS); code=$$?; \
	  if [ $$code -gt 1 ]; then exit $$code; fi; \
	  echo "demo done (exit $$code: $$( [ $$code -eq 0 ] && echo 'every gate passed' || echo 'a gate failed, see the report'))"

# Train wan2.2-t2v-shapes from its seed on clips the package renders: about 41 min on 2 cores (Xeon,
# AVX-512). The result replaces quant/pipeline/weights/wan2.2-t2v-shapes/ atomically: the checkpoint
# the default audit (audit.toml) runs, committed with this script's defaults (README, "Prompt adherence").
# WEIGHTS_ARGS adds options, e.g. WEIGHTS_ARGS=--compile (faster; other weights than the committed ones).
weights: $(STAMP)
	$(PY) -m quant.pipeline.train_shapes --seed 0 $(WEIGHTS_ARGS)

# ffmpeg is the second, independent PSNR implementation the metric tests check against; chromium
# loads the HTML report and dashboard in the browser tests; postgresql is the server the team-history
# tests start on 127.0.0.1 (as the `postgres` user when run as root). All are Debian packages.
system-deps:
	@missing=""; command -v ffmpeg >/dev/null 2>&1 || missing="$$missing ffmpeg"; \
	  command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	  ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing$$missing (Debian packages) for the tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

test: $(STAMP) system-deps
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
