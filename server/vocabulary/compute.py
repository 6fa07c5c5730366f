"""How the runtime may compute, by name: the compute dtypes and the ways to run mixed FFN widths.

Owns these value lists, once, so that the configuration, the command line and the runtime accept
exactly the same names (the runtime maps dtype names to torch dtypes itself).

Deliberately does not know: torch, or what each choice costs.
"""

from __future__ import annotations

# "auto": the dtype the checkpoint stores; float64 is for reference runs (the tests' measure of
# float32 rounding), never for serving.
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")

# Mixed FFN widths in one step: one GEMM per width on its rows, or one at the widest width with
# narrower rows masked (server/runtime/gemma3n.py); "auto" lets the runner pick by measurement.
FFN_MODES = ("grouped", "masked")
FFN_MODE_CHOICES = (*FFN_MODES, "auto")


def check_choice(setting: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{setting} must be one of {', '.join(choices)}, not {value!r}")
