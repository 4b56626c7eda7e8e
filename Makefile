# The two commands: `make demo` (the whole DAG offline on this machine) and `make test`.
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
	.venv/bin/python bench/run_bench.py

chaos: install
	.venv/bin/python bench/chaos.py

stop:
	scripts/stack.sh down

clean: stop
	rm -rf .prefect .stack runs bench/work
