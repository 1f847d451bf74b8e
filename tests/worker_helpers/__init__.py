"""Helpers of the worker tests: user functions, job graphs, a cluster."""
