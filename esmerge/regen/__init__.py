"""Stage 8, regen: the book rebuilt from the notebooks.

``regenerate`` runs the notebooks in dependency order (``notebook_graph``, ``input_keys``, ``execute``,
``monitor``, and ``assist``: a second process on an idle core), ``pages`` renders the book (with
``findings``, ``freshness``, ``sphinx_freshness``), ``ship`` copies a regeneration into
``book/shipped``, and ``reproducibility`` compares two runs.
"""
