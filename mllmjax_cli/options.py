"""Option aliases shared by every command, so that a flag means the same thing wherever it appears."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Out = Annotated[Path, typer.Option("-o", "--out", help="Where to write the result.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed; runs are deterministic for a seed.")]
Mesh = Annotated[
    str,
    typer.Option(
        "--mesh",
        help="Device mesh as axis=size pairs over (data, fsdp, tensor); -1 takes the remaining devices.",
    ),
]
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Parameter dtype: float32, bfloat16, float16, or auto (float32 on CPU, bfloat16 on accelerators).",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]

DEFAULT_MESH = "data=1,fsdp=-1,tensor=1"
