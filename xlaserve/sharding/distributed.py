"""Multi-host serving: processes joined by `jax.distributed`, one mesh over all their devices.

Process 0 (the leader) loads the model, schedules and serves. Every device step's host inputs
are broadcast from the leader before the step runs, and every other process (a follower) runs
the same jitted step on them, so all processes enter each collective together. Followers hold
the same parameters, KV cache shards and penalty state; they never schedule or tokenize.

Protocol, per device step: a header i32[2] = (command, size), then the command's inputs, whose
shapes the follower derives from (command, size) with the runner's own empty inputs. The
follower's replay loop lives in the runner (`ModelRunner.follow`).
"""

import logging

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

FORWARD, SAMPLE, PROMPT_LOGPROBS, INIT_ROW, STOP = range(5)


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Joins this process to the others (gloo collectives when the devices are CPUs)."""
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} must be in [0, num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    logger.info(
        "process %d of %d joined %s: %d local / %d global devices",
        process_id, num_processes, coordinator_address,
        jax.local_device_count(), jax.device_count(),
    )  # fmt: skip


def is_leader() -> bool:
    return jax.process_index() == 0


def broadcast(tree, is_source: bool):
    """Broadcasts a pytree of host arrays from the leader (bools travel as int32)."""
    dtypes = jax.tree.map(lambda x: np.asarray(x).dtype, tree)
    wire = jax.tree.map(
        lambda x: np.asarray(x).astype(np.int32) if np.asarray(x).dtype == np.bool_ else x, tree
    )
    out = multihost_utils.broadcast_one_to_all(wire, is_source=is_source)
    return jax.tree.map(lambda x, d: np.asarray(x).astype(d), out, dtypes)


class BroadcastSteps:
    """Leader-side wrapper of the runner's DeviceSteps: sends each step's inputs to the
    followers first, then runs it."""

    def __init__(self, steps):
        self.steps = steps

    @property
    def params(self):
        return self.steps.params

    def _send(self, command: int, size: int, payload) -> None:
        broadcast(np.array([command, size], np.int32), is_source=True)
        if payload is not None:
            broadcast(payload, is_source=True)

    def forward(self, inputs) -> None:
        self._send(FORWARD, len(inputs.input_ids), inputs)
        self.steps.forward(inputs)

    def sample(self, batch):
        self._send(SAMPLE, len(batch.temperature), batch)
        return self.steps.sample(batch)

    def prompt_logprobs(self, targets):
        self._send(PROMPT_LOGPROBS, len(targets), targets)
        return self.steps.prompt_logprobs(targets)

    def init_penalty_row(self, row, mask, counts, bias) -> None:
        payload = (row, mask, counts, bias)
        self._send(INIT_ROW, 0, payload)
        self.steps.init_penalty_row(*payload)

    def stop_followers(self) -> None:
        self._send(STOP, 0, None)
