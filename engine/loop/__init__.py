"""The training loops: one core (core.py, clock.py) under two short loops (offline.py, online.py).

- core.py: set-up (seed, device, models, optimizer, schedule), checkpoints, `accumulate`;
- clock.py: `run_steps`, the step clock (stop checks, intervals, the end of a run, final/, the summary);
- offline.py: batches from a fixed dataset;
- online.py: prompts -> sample -> score -> prepare -> update;
- schedule.py, checkpoint.py, metrics.py, evaluation.py: the pieces they share.
"""
