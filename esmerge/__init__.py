"""esmerge: a reproducible companion to *ES-Merging: Biological MLLM Merging via Embedding Space Signals*.

How the package is laid out. The paper's method is four small modules of pure functions over
tensors: ``probe`` (§4.1: probe inputs and the hidden states they give), ``layerwise`` (§4.2, Eq. 2:
SWD per block, layer coefficients), ``elementwise`` (§4.3, Eq. 3: element coefficients from scores,
which ``element_gradients`` computes from the model's per-sample gradients) and ``merge`` (Eqs. 1
and 4 only). Every merging method, ES-Merging and the
baselines, is a registry entry in ``methods`` with declared hyper-parameters; ``pipeline`` loads a
scale's base and specialists into a ``MergeContext`` and runs a method, and ``adapters`` is the one
reader and writer of adapter and merged-model folders. The models are at the edges: ``models``
(the base of each scale), ``specialists`` / ``train`` / ``captions`` / ``heldout`` (our LoRA
specialists), ``convert`` (the published paper-scale checkpoints) and ``encoders``. The data are
``data`` (the manifest of upstream files), ``sources`` (their readers) and ``benchmarks`` (the one
table of the 13 interaction benchmarks); ``evaluate`` scores models on them, ``yardstick`` is the
retrieval-only yardstick and ``retention`` the specialists' own skills after merging. Every number
that differs between the ``smoke``, ``cpu`` and ``paper`` scales is in ``scales``. The book is
rebuilt by ``regenerate`` (with ``notebook_graph``, ``input_keys``, ``execute``, ``monitor`` and
``book``); ``cache``, ``progress``, ``errors`` and ``paths`` are shared plumbing, and ``cli`` declares
every ``esmerge`` subcommand.
"""

__version__ = "0.1.0"
