"""The optional C part of capture's hot path (undo/_speedups.c); pyproject.toml holds the rest.

Without a C compiler the build goes on without it, and capture uses the same code in Python."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("undo._speedups", ["undo/_speedups.c"], optional=True)])
