"""The viewer's guideline: key g picks the rule of the next case, key n starts it with that rule, and the status
bar shows the open case's rule (pure reducer tests, no daemon)."""

from __future__ import annotations

from her2scope.clients import viewer
from her2scope.clients.viewer import Send, apply, press
from tests.helpers.viewer import Daemonish, connected


def texts(state: viewer.ViewerState) -> list[str]:
    return [text for text, _ in viewer.status_segments(state)]


def test_key_g_cycles_the_next_cases_rule_and_n_starts_the_case_with_it() -> None:
    state = connected()  # a breast case is open (the status has no guideline: an older daemon)
    _, actions = press(state, ord("n"))
    assert actions == (Send("start-case", {}),)  # nothing picked: the daemon's configured rule
    picked = []
    for _ in range(4):
        state, actions = press(state, ord("g"))
        assert actions == ()
        picked.append(state.next_rule)
        assert state.notice.startswith("next case: ")
    assert picked == [
        ("gastric", "resection"),
        ("gastric", "biopsy"),
        ("breast", "resection"),
        ("gastric", "resection"),
    ]
    state, _ = press(state, ord("g"))
    assert state.notice == "next case: gastric biopsy (press n to start it)"
    state, actions = press(state, ord("n"))
    assert actions == (Send("start-case", {"guideline": "gastric", "specimen": "biopsy"}),)
    state = apply(
        state, viewer.Replied("start-case", True, {"case_id": "c2", "guideline": "gastric", "specimen": "biopsy"})
    )
    assert state.notice == "case c2 started (gastric biopsy)"


def test_the_status_bar_shows_the_open_cases_rule_and_a_different_pick() -> None:
    daemon = Daemonish()
    state = apply(connected(daemon), daemon.status(guideline="gastric", specimen="biopsy"))
    assert "gastric biopsy" in texts(state)
    assert not any(t.startswith("next case") for t in texts(state))
    state, _ = press(state, ord("g"))  # from the open case's rule, gastric biopsy, the next is breast
    assert state.next_rule == ("breast", "resection")
    assert "next case: breast" in texts(state)
    state = apply(state, daemon.status(guideline="breast", specimen="resection"))
    assert "breast" in texts(state) and not any(t.startswith("next case") for t in texts(state))


def test_the_key_help_names_the_guideline_key() -> None:
    from her2scope.clients.viewer.content import footer_segments

    assert ("g", "guideline") in footer_segments()
