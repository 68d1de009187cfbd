"""The speedup projection: its arithmetic model (model.py: no torch, no GPU) and the command line
that fills it from flags or a run (cli.py; ``python -m megatron_lsh.projection``)."""

from megatron_lsh.projection.model import (  # noqa: F401
    Cluster,
    ModelShape,
    Projection,
    ProjectionError,
    StepTime,
    project,
    step_time,
)
