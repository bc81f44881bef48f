"""sluice: streaming pipelines whose whole lifecycle is a durable Temporal workflow."""

__version__ = "0.1.0"
