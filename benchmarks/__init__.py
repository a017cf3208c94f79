"""Cherry's benchmark harness, kept out of Cherry's installed packages (engine, jobs, tuiapp): it measures
them and imports them, they never import it. `cherry bench` reaches it through a thin entry
(tuiapp/cli/bench.py). Install it from the checkout with `pip install -e ./benchmarks` (docs/benchmarks.md).

- cli.py: the `cherry bench` commands and their reports;
- training/: Cherry against TRL (`--against trl`), the ablations, time to the first step, memory, the GPU check;
- queue_load.py, queue_load_roles.py: the several-machines queue under load (`cherry bench queue`)."""
