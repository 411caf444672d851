# quant-audit: `make demo` and `make test` each set up .venv from requirements.lock first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
QA := $(VENV)/bin/quant-audit
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps -e .
	touch $@

# Export + parity, then torch and onnx videos with per-frame PSNR, for both tiny pipelines.
demo: $(STAMP)
	@for model in wan2.2-t2v-tiny wan2.2-ti2v-tiny; do \
	  echo "== $$model =="; \
	  $(QA) export --model $$model --out $(DEMO_OUT)/demo-$$model || exit $$?; \
	  $(QA) generate --model $$model --variant torch --out $(DEMO_OUT)/demo-$$model --seeds 0,1 || exit $$?; \
	  $(QA) generate --model $$model --variant onnx --out $(DEMO_OUT)/demo-$$model --seeds 0,1 || exit $$?; \
	done

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
