"""esmerge: a reproducible companion to *ES-Merging: Biological MLLM Merging via Embedding Space Signals*.

One subpackage per pipeline stage, in the book's order; a stage imports only from earlier ones::

    data/         1  upstream files and the 13 benchmarks
    specialists/  2  base LLM, encoders, LoRA specialists, adapter folders
    signals/      3  probe, SWD layer and gradient element coefficients (Eqs. 1-4)
    methods/      4  ES-Merging and every baseline, one registry
    evaluate/     5  prompts, scoring, statistics, retention
    report/       6  tables and claim registers beside the paper's numbers
    run/          7  whole jobs: merge a scale, bring your own adapters, evaluate by name
    regen/        8  the book regenerated from the notebooks

Shared by all: ``scales`` (every number that differs between smoke, cpu and paper), ``paths``,
``cache``, ``outputs`` (how an output folder is published), ``errors``, ``progress``, ``plots``;
``cli/`` declares every ``esmerge`` command (``arguments``) and hands each to its stage (``commands``).
"""

__version__ = "0.1.0"
