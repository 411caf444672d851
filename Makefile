# quant-audit: `make demo` and `make test` each set up .venv from requirements.lock first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
QA := $(VENV)/bin/quant-audit
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs

.PHONY: demo test install system-deps clean

install: $(STAMP)

# Editable installs are path-based (editable_mode=compat): onnxruntime.transformers appends its own
# folder, which has a metrics.py, to sys.path, and would shadow our `metrics` package otherwise.

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps --config-settings editable_mode=compat -e .
	touch $@

# Export + parity, torch and onnx videos with per-frame PSNR, and the score tables, for both tiny pipelines.
demo: $(STAMP)
	@for model in wan2.2-t2v-tiny wan2.2-ti2v-tiny; do \
	  echo "== $$model =="; \
	  $(QA) export --model $$model --out $(DEMO_OUT)/demo-$$model || exit $$?; \
	  $(QA) generate --model $$model --variant torch --out $(DEMO_OUT)/demo-$$model --seeds 0,1 || exit $$?; \
	  $(QA) generate --model $$model --variant onnx --out $(DEMO_OUT)/demo-$$model --seeds 0,1 || exit $$?; \
	  $(QA) score --reference $(DEMO_OUT)/demo-$$model/videos/torch --candidate $(DEMO_OUT)/demo-$$model/videos/onnx \
	    --out $(DEMO_OUT)/demo-$$model/scores/frames.csv || exit $$?; \
	done

# ffmpeg is the second, independent PSNR implementation the metric tests check against.
system-deps:
	@command -v ffmpeg >/dev/null 2>&1 || { \
	  echo "installing ffmpeg (Debian package) for the metric tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; }

test: $(STAMP) system-deps
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
