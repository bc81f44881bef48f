"""Sources and sinks, looked up by the operator type names used in pipeline files.

The registry is two dicts, :data:`SOURCES` and :data:`SINKS`, from a pipeline ``type`` to a
``"module:Class"`` reference that is imported only when looked up (so a runner never imports a
connector it does not run, and registering one costs nothing). A type name may be registered in
both dicts (``files`` is a source and a sink): the operator's ``role`` then decides, exactly like
:func:`sluice.models.operator_role` -- ``role: source`` selects the source, an absent role or
``role: sink`` the sink.

Lookups take the operator's params dict (``Program.operators[op_id]``) or, for convenience, a type
name with an optional role. See docs/connectors.md for the interface and how to add a connector.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from sluice.engine.sinks import Sink
from sluice.engine.sources import Source

#: type name -> "module:Class"; imported lazily so that looking one up never imports the others
SOURCES: dict[str, str] = {
    "generator": "sluice.connectors.generator:GeneratorSource",
    "files": "sluice.connectors.files_source:FilesSource",
}
SINKS: dict[str, str] = {
    "files": "sluice.connectors.files:FilesSink",
    "stdout": "sluice.connectors.stdout:StdoutSink",
    "null": "sluice.connectors.null:NullSink",
}

#: what a lookup accepts: an operator's params dict (with ``type`` and maybe ``role``) or a type name
OperatorRef = Mapping[str, Any] | str


def _load(ref: str) -> type:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _type_and_role(spec: OperatorRef, role: str | None) -> tuple[str | None, str | None]:
    if isinstance(spec, str):
        return spec, role
    return spec.get("type"), role if role is not None else spec.get("role")


def connector_role(spec: OperatorRef, role: str | None = None) -> str | None:
    """``"source"`` or ``"sink"`` when `spec` names a registered connector, else None.

    `role` (or ``spec["role"]``) only matters for a type registered as both, and must not
    contradict a type registered as one only (``generator`` with ``role: sink`` is None).
    """
    type_name, role = _type_and_role(spec, role)
    if type_name is None:
        return None
    is_source, is_sink = type_name in SOURCES, type_name in SINKS
    if is_source and is_sink:
        return "source" if role == "source" else "sink"
    if is_source and role in (None, "source"):
        return "source"
    if is_sink and role in (None, "sink"):
        return "sink"
    return None


def source_class(spec: OperatorRef, role: str | None = None) -> type[Source] | None:
    """The source class for an operator (its params dict, or a type name plus optional role), or
    None when it is not a source. ``source_class({"type": "files", "role": "source", ...})`` and
    ``source_class("files", "source")`` give the files source; ``source_class("files")`` is None."""
    if connector_role(spec, role) != "source":
        return None
    type_name, _ = _type_and_role(spec, role)
    return _load(SOURCES[str(type_name)])


def sink_class(spec: OperatorRef, role: str | None = None) -> type[Sink] | None:
    """The sink class for an operator (its params dict, or a type name plus optional role), or
    None when it is not a sink.

    The controller uses its class methods ``commit(params, commits, before_publish=...)`` and
    ``recover(params, manifest)``; ``params`` is ``Program.operators[op_id]`` (includes ``id``).
    """
    if connector_role(spec, role) != "sink":
        return None
    type_name, _ = _type_and_role(spec, role)
    return _load(SINKS[str(type_name)])


def connector_class(spec: OperatorRef, role: str | None = None) -> type[Source | Sink] | None:
    """The source or sink class for an operator, or None when it is neither (a transform)."""
    return source_class(spec, role) or sink_class(spec, role)
