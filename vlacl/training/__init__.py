"""The training loop of ``train-task`` and its parts.

- :mod:`vlacl.training.loop`: :func:`~vlacl.training.loop.run_train_task`, the command as a library call.
- :mod:`vlacl.training.model`: backbone + adapters + head of one task, and how their weights are saved.
- :mod:`vlacl.training.data`: a stream task's datasets, the resumable sampler, data loaders.
- :mod:`vlacl.training.optim`: AdamW, parameter groups, warmup + decay schedules.
- :mod:`vlacl.training.guards`: the checks that stop a run that cannot learn, and the OOM report.
- :mod:`vlacl.training.checkpoint`: the task checkpoint's CL state and the mid-task resume state.

Nothing is imported here, so that importing one part does not load the others.
"""
