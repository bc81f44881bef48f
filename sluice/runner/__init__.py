"""The runner: a data-plane process (`python -m sluice.runner`) that executes some subtasks of a job.

`server` is the process itself (control API, event stream, metrics, task supervision); `client` is
what the controller's activities use to talk to it. The wire contract is docs/runner-protocol.md.
"""
