"""Every merging method, imported here so that the registry is complete and a reader can list it.

Each module registers its methods with ``esmerge.methods.register`` when it is imported:

* ``static`` -- Average, TIES, PCB, Consensus; ``emr`` -- EMR-Merging; ``graft`` -- Graft;
* ``es`` -- ES-Merging and its layer-only and element-only ablations;
* ``adamerging`` -- AdaMerging; ``finetune`` -- Avg+FT; ``lsmerge`` -- LS-Merge.
"""
from esmerge.methods import adamerging, emr, es, finetune, graft, lsmerge, static  # noqa: F401

MODULES = (static, emr, graft, es, adamerging, finetune, lsmerge)
