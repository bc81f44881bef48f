"""Every timeout and limit of the host registry workflow, named, with why.

A module of its own (imported by the workflow with imports passed through the sandbox), so tests
can lower a limit for one worker with `monkeypatch.setattr` and the workflow sees it; the
workflow reads them as `RC.NAME` at the time of use for that reason.
"""

from __future__ import annotations

from datetime import timedelta

#: A host's lease activity runs as long as the host does; it ends by its heartbeat timeout,
#: by the host returning (shutdown), or by cancellation. This only bounds a lease that keeps
#: heartbeating forever without anyone reading it.
LEASE_START_TO_CLOSE = timedelta(days=365)

#: After a lease failed by an error of its own (not a timeout: e.g. the host's activity raised),
#: the next lease starts after this pause, so a host that fails leases at once cannot spin the
#: registry's history. Timeouts restart the lease at once.
LEASE_FAILURE_PAUSE = timedelta(seconds=1)

#: A run continues as new (at its next safe point) once its history has this many events, well
#: before the server's suggestion (4,096 by default): replays and history fetches stay cheap.
CONTINUE_AS_NEW_EVENTS = 2_000

#: Hosts declared lost are remembered (so their re-registration is answered `declared_lost`)
#: up to this many; the oldest are forgotten first.
LOST_HOSTS_KEPT = 1_000

#: Longest job id, host id or label the registry accepts (they are quoted in reasons and logs).
MAX_ID_LENGTH = 200

#: Longest reason sent with a `slots_freed` signal.
SLOTS_FREED_REASON_CHARS = 200

#: Renewed leases in a row that time out without one heartbeat before a host is declared lost
#: (each was taken by a poll of a dead, cut off or frozen process; see the lease loop).
UNANSWERED_RENEWALS_TO_LOSE = 2
