"""Going back to an earlier point of the run when validation collapses (`rewind_below`)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from accelerate.utils import send_to_device


@dataclass
class Rewind:
    """Not in the paper: a way back from a removal the model does not recover from.

    Whether a from-scratch model recovers from a hard removal can depend on the run's own draw (data
    order, smoothing), not only on its settings. So after `patience` validations in a row below `floor`,
    training goes back to the last validation at or above it (`to: last`), or to the best one since
    removal began (`to: best`), restoring weights, optimizer state and removal count, and goes on
    with the data that follows (the learning-rate drop and the end come as many steps later as were
    undone), as PaLM went back to a checkpoint before a loss spike and skipped the batches that led
    to it (Chowdhery et al. 2022). The point is a copy in CPU memory, and it travels in checkpoints.

    `to: start` goes back to the run's first step (the initial weights, no optimizer state, nothing
    removed): a new draw of the whole removal, judged only once every CoT token is gone, where a
    draw that succeeds comes back. Measured effects: docs/RESULTS.md.
    """

    floor: float
    patience: int
    most: int
    to: str = "last"
    below: int = 0
    rewinds: int = 0
    steps_undone: int = 0  # the schedule's steps given back by rewinds: lr_drop_step comes as much later
    best: float = -math.inf  # the point's accuracy, with `to: best`
    point: dict | None = None

    def keeps(self, accuracy: float) -> bool:
        """Whether this validation becomes the point to go back to."""
        if self.to == "start" or accuracy < self.floor or (self.to == "best" and accuracy <= self.best):
            return False
        self.best = max(self.best, accuracy)
        return True

    def collapsed(self, accuracy: float) -> bool:
        """Count a validation result; True when training should go back to `point` now."""
        self.below = 0 if accuracy >= self.floor else self.below + 1
        return self.below >= self.patience and self.point is not None and self.rewinds < self.most


def cpu_copy(state):
    return copy.deepcopy(send_to_device(state, "cpu"))  # on a CPU run the move alone would share the tensors
