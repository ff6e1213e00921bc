"""Deprecated alias: this module is now ``pipeline.output.search``; importing it gives that module."""

import importlib
import sys
import warnings

warnings.warn("pipeline.search is now pipeline.output.search", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("pipeline.output.search")
