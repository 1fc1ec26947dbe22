"""Run under ``accelerate launch`` by tests/test_train_accelerate.py: two tasks with MIR, two with EWC.

Each process writes its own CL state after each run (``<out>.rank<i>.safetensors``), so that the
test can check that every process ended with the same memory, cache and Fisher.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.train_factories import Stream
from vlacl.cl.base import get_algorithm
from vlacl.training.loop import run_train_task


def main(data: str, stats: str, model: str, root: str) -> None:
    """Train tasks 0 and 1 with ``mir`` (refresh every 2 steps) and with ``ewc``; dump each rank's CL state."""
    stream = Stream(Path(data), Path(stats), Path(model))
    out = Path(root)
    options = {"mir": {"refresh": 2, "candidates": 8, "top_k": 4, "per_task": 16}, "ewc": {"fisher_samples": 8}}
    for name, opts in options.items():
        prev = None
        for task in (0, 1):
            algo = get_algorithm(name, opts)
            cfg = stream.config(steps=4, batch_size=4, cl=name, cl_options=opts, task=f"#{task}", device="cpu")
            target = out / f"{name}{task}"
            run_train_task(cfg, out=target, prev=prev, algorithm=algo)
            state = algo.state_dict()
            tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            save_file(tensors, str(out / f"{name}{task}.rank{rank}.safetensors"))
            prev = target


if __name__ == "__main__":
    main(*sys.argv[1:5])
