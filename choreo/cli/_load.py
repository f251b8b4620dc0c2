"""Importing agents from ``module:attribute`` specs, with errors a user can act on."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from ..agent import Agent
from ..errors import ConfigError


def load_agent(spec: str) -> Agent[Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"agent spec {spec!r} must look like 'package.module:agent'")
    if os.getcwd() not in sys.path:  # like uvicorn: modules in the working directory import
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for {spec!r}: {exc}") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, Agent):
        raise ConfigError(f"{spec!r} is a {type(obj).__name__}, not a choreo.Agent")
    return obj
