"""Prefect flows: thin wrappers that run `stages` functions as tasks.

Each DVC stage's `cmd` is `python -m flows.<stage>`. Importing this package first sets
the environment Prefect and MLflow read at import time (see flows/common.py).
"""

from flows.common import setup_env

setup_env()
