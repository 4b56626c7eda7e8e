"""Development tooling, not part of the product: the offline Vast.ai emulator (`devtools.emulator`)
and the local stack driver (`devtools.stack`: Prefect server, emulator, worker/runner) that the demo,
the benchmarks and the tests use. Run from the repository root (`python -m devtools.stack up`);
`pip install .` does not ship it (pyproject's packages.find lists only the product packages)."""
