"""Deprecated alias: this module is now ``pipeline.output.read_back``; importing it gives that module."""

import importlib
import sys
import warnings

warnings.warn("pipeline.reader is now pipeline.output.read_back", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("pipeline.output.read_back")
