"""Whether llama.cpp may repack the weights into its CPU "extra buffer types" (AMX tiles, the
AVX2/AVX-512/NEON interleaved Q4_0 layouts): `llama_model_params.use_extra_bufts`.

`choose_repack` is pure. `auto` turns repacking off when the llama.cpp build carries the AMX
kernels: `ggml_backend_amx_mul_mat` segfaults (upstream llama.cpp issue #20824; here, on a Xeon
with AMX and the `GGML_NATIVE` build that `pip install llama-cpp-python` compiles on such a host,
on the tiny GLM's first prompt and on every 256-token prompt of the bench GLM: bench/repack.py).
Off, llama.cpp's ordinary CPU kernels run. `repack = true` turns it back on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AMX_MARK = "AMX_INT8 = 1"  # how `llama_print_system_info()` reports a build with the AMX kernels


@dataclass(frozen=True)
class RepackChoice:
    enabled: bool
    reason: str


def choose_repack(setting: Literal["auto"] | bool, system_info: str) -> RepackChoice:
    """`setting` is `model.repack`; `system_info` is `llama_print_system_info()` of the build."""
    if setting is True:
        return RepackChoice(True, "repack = true: weights repacked for this CPU (AMX kernels too, if built in)")
    if setting is False:
        return RepackChoice(False, "repack = false: weights used as stored in the GGUF")
    if AMX_MARK in system_info:
        return RepackChoice(False, "auto: this llama.cpp build has the AMX kernels, which can segfault "
                                   "(llama.cpp issue #20824); weights used as stored. Set model.repack = true "
                                   "to use AMX anyway")
    return RepackChoice(True, "auto: weights repacked for this CPU (llama.cpp's default)")
