"""The contract between the orchestrator (flows/, tasks/, infra/) and the code that runs on the machine (steps/).

Both sides import it and it imports neither: the run configuration's schema (config, machine),
the step catalogue (catalogue), where things live on the machine (layout), the machine's own
Python environment (remote_env) and how a step's result.json is read and written (result_file).
"""
