"""Deprecated alias: this module is now ``pipeline.output.report``; importing it gives that module."""

import importlib
import sys
import warnings

warnings.warn("pipeline.report is now pipeline.output.report", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("pipeline.output.report")
