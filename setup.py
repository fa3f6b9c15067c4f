"""Build of the native transform path (service/_native.c); the rest is in pyproject.toml.

The extension is optional: without a C compiler or libcrypto's headers the install goes
on and the transform runs its Python path (same outputs, slower). scripts/bootstrap.sh
installs both, so a development install always has it, and tests/unit/test_native.py
fails when it is missing there.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "service._native",
            sources=["service/_native.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
