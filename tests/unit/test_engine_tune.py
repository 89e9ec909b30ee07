"""The auto-tuner's search and choice (pure: a fake measure and a fake clock)."""

from __future__ import annotations

from pathlib import Path

from edge_agent.engine.profile import read_profile
from edge_agent.tune.llama import Candidate, profile_toml, search_space, table
from edge_agent.tune.search import Trial, best, search

SPACE = search_space(cpu_count=4, gpu_layer_options=[0])


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_measure(clock: FakeClock, seconds: float = 1.0):
    """Fastest at 2 threads, batch 128, flash attention on; TTFT grows with the batch."""
    def measure(c: Candidate) -> Trial:
        clock.now += seconds
        speed = 100 - abs(c.n_threads - 2) * 10 + (5 if c.n_batch == 128 else 0) + (3 if c.flash_attn else 0)
        return Trial(c, ttft_ms=c.n_batch / 10, tokens_per_s=speed, seconds=seconds)
    return measure


def test_the_search_space_tries_one_two_and_all_threads() -> None:
    assert SPACE["n_threads"] == [1, 2, 4]


def test_coordinate_descent_finds_the_best_value_of_each_setting() -> None:
    clock = FakeClock()
    trials = search(Candidate(n_threads=4), SPACE, fake_measure(clock), "tokens_per_s", None, 1000, clock)
    winner = best(trials, "tokens_per_s", None)
    assert winner is not None
    assert (winner.candidate.n_threads, winner.candidate.n_batch, winner.candidate.flash_attn) == (2, 128, True)
    assert len({t.candidate for t in trials}) == len(trials), "no candidate is measured twice"


def test_the_search_starts_no_trial_that_would_overrun_the_budget() -> None:
    clock = FakeClock()
    trials = search(Candidate(n_threads=4), SPACE, fake_measure(clock, seconds=10), "tokens_per_s", None, 35, clock)
    assert len(trials) == 3
    assert clock.now <= 35


def test_a_quantized_kv_cache_brings_flash_attention_and_ubatch_never_exceeds_batch() -> None:
    candidate = Candidate(n_threads=1, n_batch=128, n_ubatch=512, kv_type="q8_0").normalized()
    assert candidate.flash_attn and candidate.n_ubatch == 128


def trial(ttft: float, speed: float, error: str | None = None) -> Trial:
    return Trial(Candidate(n_threads=int(speed)), ttft, speed, 1.0, error)


def test_the_latency_bound_excludes_slow_starts_and_the_target_picks_among_the_rest() -> None:
    trials = [trial(80, 50), trial(20, 30), trial(10, 20), trial(5, 99, error="load failed")]
    assert best(trials, "tokens_per_s", None).tokens_per_s == 50
    assert best(trials, "tokens_per_s", 25).tokens_per_s == 30
    assert best(trials, "ttft", None).ttft_ms == 10


def test_when_nothing_meets_the_latency_bound_the_lowest_ttft_wins() -> None:
    assert best([trial(80, 50), trial(60, 10)], "tokens_per_s", 5).ttft_ms == 60


def test_the_written_profile_is_one_the_agent_can_load(tmp_path: Path) -> None:
    winner = Trial(Candidate(n_threads=2, n_batch=128, n_ubatch=128, flash_attn=True, kv_type="q8_0"), 12.5, 70.0, 1)
    path = tmp_path / "profile.toml"
    path.write_text(profile_toml(winner, Path("glm.gguf"), "tokens_per_s", 50, 9))
    profile = read_profile(path)
    assert profile.model.n_threads == 2 and profile.model.type_v == "q8_0" and profile.model.flash_attn is True
    assert profile.tuned["tokens_per_s"] == 70.0


def test_the_table_marks_the_winner_and_the_trials_over_the_latency_bound() -> None:
    trials = [trial(80, 50), trial(20, 30)]
    text = table(trials, trials[1], 25)
    assert "WINNER" in text.splitlines()[3] and "over latency" in text.splitlines()[2]


def test_onnx_models_are_tuned_over_threads_graph_optimization_and_execution_mode() -> None:
    from edge_agent.tune.onnx import onnx_search_space

    assert onnx_search_space(2) == {"intra_op_threads": [1, 2], "graph_optimization": ["all", "basic", "extended"],
                                    "parallel_execution": [False, True]}
