"""Stage 1, data: the upstream files and the 13 interaction benchmarks built from them.

* ``files`` -- the manifest (``data_manifest/files.yaml``): where each file resolves, its sha256, fetching;
* ``sources`` -- readers of the upstream corpora (ChEBI-20, Swiss-Prot GO, PBMC68k, CCLE, ...);
* ``benchmarks`` -- the one table of the 13 benchmarks of Tables 1-2 (groups, kinds, prompt fields, rows);
* ``benchmark_pools`` -- the seeded evaluation, in-context and protocol pools drawn from a benchmark's rows;
* ``tables`` -- the data chapter's tables.
"""
