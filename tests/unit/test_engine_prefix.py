"""The prefix cache's decisions: which cached state to load, which one a new state replaces."""

from __future__ import annotations

from edge_agent.engine.prefix import MIN_GAIN_TOKENS, best_entry, common_prefix, superseded

SYSTEM_A = tuple(range(100, 300))
SYSTEM_B = tuple(range(500, 700))


def test_common_prefix_counts_the_shared_leading_tokens() -> None:
    assert common_prefix((1, 2, 3), (1, 2, 4, 5)) == 2
    assert common_prefix((), (1,)) == 0


def test_the_entry_sharing_the_longest_prefix_is_loaded() -> None:
    prompt = list(SYSTEM_A) + [7, 8, 9]
    found = best_entry([SYSTEM_B + (1,), SYSTEM_A + (1, 2)], prompt, in_context=0)
    assert found == (SYSTEM_A + (1, 2), len(SYSTEM_A))


def test_nothing_is_loaded_unless_it_beats_what_the_context_holds() -> None:
    prompt = list(SYSTEM_A) + [7]
    assert best_entry([SYSTEM_A], prompt, in_context=len(SYSTEM_A) - MIN_GAIN_TOKENS + 1) is None
    assert best_entry([], prompt, in_context=0) is None


def test_the_last_prompt_token_is_never_counted_as_cached() -> None:
    prompt = list(SYSTEM_A)
    assert best_entry([SYSTEM_A + (1,)], prompt, in_context=0) == (SYSTEM_A + (1,), len(SYSTEM_A) - 1)


def test_a_new_state_replaces_one_with_the_same_system_prompt_but_not_another_prompt() -> None:
    assert superseded(SYSTEM_A + (1, 2), SYSTEM_A + (3,))
    assert not superseded(SYSTEM_B + (1,), SYSTEM_A + (3,))
