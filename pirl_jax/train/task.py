"""What a task gives the training loop (`train.loop.Run.train`): its state, step, batches and
evaluators (`Task`), and the evaluator interface (`Evaluator`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Protocol, Sequence

import jax


class Evaluator(Protocol):
  """Scores a state; run inside any loop on a schedule (and at the end)."""

  name: str

  def run(self, state) -> dict[str, float]:
    """Metrics of `state` (flat, scalar). May write files of its own into the workdir."""

  def describe(self, metrics: dict[str, float]) -> str:
    """A short text of the headline metrics, for the progress log."""


@dataclasses.dataclass
class Task:
  """What a run trains: the task-specific pieces the loop drives.

  Attributes:
    state: the initial state, born sharded with `shardings`.
    shardings: the state's shardings (the restore target's).
    train_step: jitted `(state, batch) -> (state, metrics)`; metrics are scalars and include
      `loss` and `grad_norm`.
    batches: `batches(start_step)` iterates this process's host batches from that step on.
    total_steps: steps of the whole run.
    steps_per_epoch: for the progress line.
    describe: text of a log window's mean metrics for the progress line.
    evaluators: run every `eval_every_steps` and after the last step.
    eval_every_steps: 0 = only after the last step.
    resize: top-level state fields whose leading dimension may differ in a checkpoint written on
      another device count (the memory bank's padding rows).
    derive: state fields a checkpoint of an earlier version may lack -> a function computing
      each from the restored fields (`checkpointing.Checkpointer.restore`).
    check_restorable: called with a checkpoint's saved shapes before restoring it; raises when
      the checkpoint cannot belong to this run.
    on_evaluation: called with (step, state, {evaluator name: metrics}) after each evaluation
      (model selection).
    finish: called with the final state after the last step; returns results for the summary.
    state_step: reads the step counter of a state.
  """

  state: Any
  shardings: Any
  train_step: Callable
  batches: Callable[[int], Iterator[dict]]
  total_steps: int
  steps_per_epoch: int
  describe: Callable[[dict], str]
  evaluators: Sequence[Evaluator] = ()
  eval_every_steps: int = 0
  resize: tuple[str, ...] = ()
  derive: dict | None = None
  check_restorable: Callable[[dict], None] | None = None
  on_evaluation: Callable[[int, Any, dict], None] | None = None
  finish: Callable[[Any], dict] | None = None
  state_step: Callable[[Any], int] = lambda state: int(jax.device_get(state.step))
