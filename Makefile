# The two commands: `make demo` (the whole DAG offline on this machine, on its own pools) and `make test`.
.PHONY: install demo test test-fast bench chaos stop clean

install:
	scripts/install.sh

demo:
	scripts/demo.sh

test: install
	.venv/bin/python -m pytest -q

test-fast: install
	.venv/bin/python -m pytest -q -m "not slow"

bench: install
	.venv/bin/python -m benchmarks.run_bench

chaos: install  # every scenario twice (--repeat 2), then README's table from the new chaos.json
	.venv/bin/python -m benchmarks.chaos; rc=$$?; .venv/bin/python -m benchmarks.chaos --render-readme; exit $$rc

stop:  # the local stack (devtools/stack.py); nothing to stop without a venv
	[ ! -x .venv/bin/python ] || .venv/bin/python -m devtools.stack down

clean: stop
	rm -rf .prefect .stack runs benchmarks/work
