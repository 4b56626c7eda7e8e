"""The on-machine workload: prepare, train (QAT), convert (ONNX), bench, evaluate.

Runs on the rented GPU and on this machine's CPU alike, and never imports Prefect.
"""
