"""Stage 7, run: whole jobs over the earlier stages, as the CLI and the notebooks start them.

* ``merge`` -- load a scale's base and specialists into a ``MergeContext``, run a method, write the merge;
* ``baseline_inputs`` -- the prompts and objectives the training baselines (and Graft) are given;
* ``all_methods`` -- every method at one set of specialists, the budget curves, and chapter 6's assist;
* ``retention_runs`` -- the models chapter 9 scores at each specialist seed, and its assist;
* ``byo`` -- bring your own LoRA adapters: ES-merge adapters trained elsewhere;
* ``evaluate_named`` -- ``esmerge evaluate``: models named on the command line, evaluated.
"""
