# Two commands do everything on a fresh machine:
#   make demo   set up (once) and pre-train MAE-Tiny on the embedded photos, on the CPU, in minutes
#   make test   set up (once) and run the test suite
#   make smoke  set up (once) and run every workflow step (pre-train ... export) on the photos in about a minute
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision as this kind of machine provides them; override for your own CUDA build, e.g.
#   make setup TORCH="torch==2.5.1 torchvision==0.20.1"
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.mae-lite-installed

.PHONY: setup demo smoke test bench findings clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q $(TORCH)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# run again, it continues an interrupted demo (or says it has finished); make clean-demo, then make demo starts over
DEMO_CKPT := outputs/demo/mae_tiny/last_epoch_ckpt.pth.tar
demo: setup
	$(VENV)/bin/ssl_train -b 128 -d cpu -e 30 -f mae_lite_demo $$(test -f $(DEMO_CKPT) && echo --resume) \
	    --exp-options exp_name=demo/mae_tiny

smoke: setup
	$(VENV)/bin/ssl_smoke --out outputs/smoke

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/step_speed.py

# the paper's findings at small scale (~2.2 h on 2 cores; cached, rerun to continue): docs/findings.md
findings: setup
	$(PY) -m pip install --disable-pip-version-check -q -e '.[findings]'
	$(PY) benchmarks/paper_findings.py

clean-demo:
	rm -rf outputs/demo
