"""Reading back what a training run logged to tensorboard, for the studies that summarise runs."""

from pathlib import Path
from typing import Callable, List


def logged_series(tensorboard: Path) -> Callable[[str], List[float]]:
    """A run's scalars: series(tag) -> the values logged under tag, in logging order ([] if none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    return lambda tag: [e.value for e in events.Scalars(tag)] if tag in tags else []
