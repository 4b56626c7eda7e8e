"""Maintenance scripts, run from the repository root: `python -m scripts.synth_french`,
`python -m scripts.verify_base_conversion` (the shell scripts are called by the Makefile)."""
