"""Sources and sinks, looked up by the operator type names used in pipeline files.

See docs/connectors.md for the interface and how to add a connector.
"""

from __future__ import annotations

import importlib

from sluice.engine.sinks import Sink
from sluice.engine.sources import Source

#: type name -> "module:Class"; imported lazily so that looking one up never imports the others
SOURCES: dict[str, str] = {"generator": "sluice.connectors.generator:GeneratorSource"}
SINKS: dict[str, str] = {"files": "sluice.connectors.files:FilesSink"}


def _load(ref: str) -> type:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def source_class(type_name: str) -> type[Source] | None:
    """The source class for a pipeline operator type, or None when it is not a source."""
    ref = SOURCES.get(type_name)
    return _load(ref) if ref else None


def sink_class(type_name: str) -> type[Sink] | None:
    """The sink class for a pipeline operator type, or None when it is not a sink.

    The controller uses its class methods ``commit(params, commits)`` and
    ``recover(params, manifest)``; ``params`` is ``Program.operators[op_id]`` (includes ``id``).
    """
    ref = SINKS.get(type_name)
    return _load(ref) if ref else None
