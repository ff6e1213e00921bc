"""Deprecated alias: this module is now ``pipeline.output.weaviate_import``; importing it gives that module."""

import importlib
import sys
import warnings

warnings.warn("pipeline.weaviate_import is now pipeline.output.weaviate_import", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("pipeline.output.weaviate_import")
