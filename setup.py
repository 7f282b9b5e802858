"""The one compiled part of the Python package: ``kvwire._scatter`` (kvwire/_scatter.c).

Optional: where it does not build (no C compiler), kvwire installs without it and moves
chunks that carry some heads of each token through a staging copy instead
(kvwire/scatter.py says which path is in use), and the CPU codecs take their torch and
numpy paths (the same bytes, several times slower)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvwire._scatter", ["kvwire/_scatter.c"], optional=True, extra_compile_args=["-O3", "-ffp-contract=off"])])
