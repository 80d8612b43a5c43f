"""The optional C part of capture's hot path (undo/_speedups.c); pyproject.toml holds the rest.

Without a C compiler the build goes on without it, and capture uses the same code in Python.
``UNDO_STRICT_BUILD=1`` (``./dev test`` sets it, and so CI) builds it with every warning an
error, and a build that fails fails the install: a user's install never does, whatever a newer
compiler warns about."""

import os

from setuptools import Extension, setup

strict = os.environ.get("UNDO_STRICT_BUILD") == "1"
setup(
    ext_modules=[
        Extension(
            "undo._speedups",
            ["undo/_speedups.c"],
            extra_compile_args=["-Wall", "-Wextra", "-Werror"] if strict else [],
            optional=not strict,
        )
    ]
)
