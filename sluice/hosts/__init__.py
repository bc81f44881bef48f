"""Runner hosts: `sluice host` processes that offer runner slots, registered in Temporal.

- `contracts`: the typed messages between hosts, the registry and jobs.
- `registry`: HostRegistryWorkflow, the one place that knows every host and every reserved slot.
- `placement`: which hosts a generation's runners go to (pure).
- `host`: the host process: a Temporal worker on the host's own task queue, its runners' liveness.
"""
