"""The live job dashboard: `sluice ui` (and `sluice run`) serve it; see docs/dashboard.md.

`views` gathers what a job's page shows (status, graph, checkpoints, metrics) and applies its
actions through `JobClient`; `server` is the aiohttp application around it (static page and a
small JSON API); `static/` is the page itself (plain HTML, CSS and JavaScript, no build step).
"""
