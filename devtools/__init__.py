"""Development tooling, not part of the product: the offline Vast.ai emulator (`devtools.emulator`)
and the local stacks (Prefect server, emulator, something that runs flows): the demo's long-lived one
(`devtools.stack`: process workers; `python -m devtools.stack up`, run from the repository root) and
the throwaway one of the chaos bench and the slow tests (`devtools.throwaway_stack`: Runners);
`pip install .` does not ship it (pyproject's packages.find lists only the product packages)."""
