"""Registered stages, one package each: `config.py` holds its typed Config, `__init__.py` its `run`.

A stage never imports another stage: what one hands the next is a format in `formats/`, and shared method
code lives in `kd/` (tests/unit/test_architecture.py checks both).
"""
