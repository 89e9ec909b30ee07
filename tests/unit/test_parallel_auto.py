"""`model.parallel = "auto"`: the pure choice of N from memory and the KV size per sequence."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from edge_agent.engine.parallel import MAX_AUTO, MIB, RESERVE_BYTES, available_memory, choose_parallel
from edge_agent.engine.settings import ModelConfig

GIB = 1024 * MIB


def test_n_is_how_many_kv_windows_fit_in_half_of_what_is_left() -> None:
    # 2 GiB available, 512 MiB model, 256 MiB reserve: (2048 - 512 - 256) / 2 = 640 MiB for KV
    choice = choose_parallel(kv_bytes_per_seq=100 * MIB, model_bytes=512 * MIB, available_bytes=2 * GIB)
    assert choice.n == 6
    assert "2048 MiB available" in choice.reason and "100.0 MiB per sequence" in choice.reason


def test_capped_at_max_auto_and_says_so() -> None:
    choice = choose_parallel(kv_bytes_per_seq=1 * MIB, model_bytes=0, available_bytes=64 * GIB)
    assert choice.n == MAX_AUTO
    assert f"capped at {MAX_AUTO}" in choice.reason


def test_at_least_one_when_nothing_fits() -> None:
    choice = choose_parallel(kv_bytes_per_seq=GIB, model_bytes=GIB, available_bytes=GIB + RESERVE_BYTES)
    assert choice.n == 1
    assert "not even one" in choice.reason


@pytest.mark.parametrize(("kv", "available"), [(None, GIB), (0, GIB), (MIB, None)])
def test_unknown_inputs_give_one_with_what_to_do(kv: int | None, available: int | None) -> None:
    choice = choose_parallel(kv, 0, available)
    assert choice.n == 1
    assert "set model.parallel" in choice.reason


def test_available_memory_reads_mem_available(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  8000 kB\nMemFree:  100 kB\nMemAvailable:  2048 kB\n")
    assert available_memory(meminfo) == 2048 * 1024
    meminfo.write_text("MemTotal:  8000 kB\n")
    assert available_memory(meminfo) is None
    assert available_memory(tmp_path / "missing") is None


def test_config_takes_auto_or_a_bounded_number() -> None:
    assert ModelConfig(path=Path("m.gguf"), parallel="auto").parallel == "auto"
    assert ModelConfig(path=Path("m.gguf"), parallel=4).parallel == 4
    with pytest.raises(ValidationError):
        ModelConfig(path=Path("m.gguf"), parallel=0)
    with pytest.raises(ValidationError):
        ModelConfig(path=Path("m.gguf"), parallel="many")
