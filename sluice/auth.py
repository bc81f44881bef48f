"""Runner credentials: a token per (job, generation), derived from the shared secret."""

from __future__ import annotations

import hashlib
import hmac

TOKEN_ENV = "SLUICE_RUNNER_TOKEN"
JOB_HEADER = "X-Sluice-Job"
GENERATION_HEADER = "X-Sluice-Generation"


def runner_token(secret: bytes, job_id: str, generation: int) -> str:
    """The bearer token of one job generation: a runner of any other generation cannot use it."""
    msg = f"sluice-runner\x00{job_id}\x00{generation}".encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def tokens_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
