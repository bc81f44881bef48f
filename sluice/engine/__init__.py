"""Dataflow engine: program compilation, operators, in-band control messages and task execution."""
