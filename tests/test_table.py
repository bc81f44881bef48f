"""The state table as data: consistent with the public state names, and the docs match it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.workflows.table import STATES, TERMINAL, TRANSITIONS, IllegalTransition, check_transition, markdown

DOCS = Path(__file__).resolve().parent.parent / "docs" / "states.md"


def test_every_transition_joins_known_states_and_terminals_have_no_way_out() -> None:
    for t in TRANSITIONS:
        assert t.source in STATES and t.target in STATES, t
        assert t.source not in TERMINAL, f"{t.source} is terminal: a new run restarts it, not a transition"


def test_every_state_is_reachable_and_every_non_terminal_state_can_leave() -> None:
    reached = {"Created"} | {t.target for t in TRANSITIONS}
    assert reached == set(STATES)
    assert {t.source for t in TRANSITIONS} == set(STATES) - TERMINAL


def test_illegal_transitions_are_refused() -> None:
    check_transition("Running", "CheckpointStopping")
    with pytest.raises(IllegalTransition, match="Stopped -> Running"):
        check_transition("Stopped", "Running")
    with pytest.raises(IllegalTransition):
        check_transition("Created", "Running")


def test_docs_state_diagram_is_generated_from_the_table() -> None:
    assert DOCS.read_text() == markdown(), "regenerate: python -m sluice.workflows.table > docs/states.md"
