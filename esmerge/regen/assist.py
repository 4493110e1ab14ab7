"""Assists: a second process that fills a long notebook's caches while a core would otherwise idle.

The notebook graph is two wide at best, so under ``esmerge regenerate --jobs 2`` one core idles
whenever a long notebook runs alone (``06_merging`` after the probe chapters, ``09_retention``
after ``07_results``). ``ASSISTS`` names, for such a chapter, a function that does part of its work.

When a slot is free and no notebook is ready to start, the regenerator runs that function in a
process of its own (``python -m esmerge.regen.assist``) with the notebook's injected parameters,
under the same environment (runs folder, one compute thread). The function computes, through the
same code, the content-keyed entries the notebook is about to compute, from the other end of its
list; each entry is locked while it is computed and written atomically, so the notebook reads what
the assist finished and computes the rest itself. An assist changes no result, only which process
computes an entry: it is stopped when its notebook finishes or when a notebook needs the slot, and
what it leaves unfinished is simply computed by the notebook.
"""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

# chapter -> "module:function" that fills its caches (imported only in the assist's own process); each
# function takes the chapter's injected parameters (scale, seed) and has the chapter's defaults
ASSISTS = {
    "06_merging": "esmerge.run.all_methods:fill_seed_merges",
    "09_retention": "esmerge.run.retention_runs:fill_retention",
}


def free_assist_slots(jobs: int, running: int, ready: int) -> int:
    """Slots left for assists once ``running`` notebooks run and ``ready`` ones start (they come first).

    >>> free_assist_slots(2, 1, 0), free_assist_slots(2, 1, 1), free_assist_slots(2, 2, 0), free_assist_slots(1, 1, 0)
    (1, 0, 0, 0)
    """
    return max(0, jobs - running - ready)


class Assists:
    """The assist processes of running notebooks: at most one per notebook; ``say`` reports failures."""

    def __init__(self, log_dir: Path, cwd: Path, say: Callable[[str], None]):
        self.log_dir, self.cwd, self.say = Path(log_dir), Path(cwd), say
        self._procs: dict[str, subprocess.Popen] = {}

    def __len__(self) -> int:
        return len(self._procs)

    def __contains__(self, stem: str) -> bool:
        return stem in self._procs

    def start(self, stem: str, target: str, parameters: dict) -> None:
        """Run ``target`` (``module:function``) with ``parameters`` beside notebook ``stem``."""
        log = open(self.log_dir / f"{stem}.assist.log", "w")
        self._procs[stem] = subprocess.Popen(
            [sys.executable, "-m", "esmerge.regen.assist", target, json.dumps(parameters)],
            cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.say(f"  assist      {stem}: {target} fills its caches on the idle core")

    def stop(self, stem: str) -> None:
        """Stop ``stem``'s assist (if any); an assist that had failed on its own is reported in one line."""
        proc = self._procs.pop(stem, None)
        if proc is None:
            return
        code = proc.poll()
        if code is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elif code != 0:
            lines = (self.log_dir / f"{stem}.assist.log").read_text(errors="replace").strip().splitlines()
            self.say(f"  assist      {stem}'s assist stopped with an error (the notebook computes its entries "
                     f"itself): {lines[-1] if lines else f'exit code {code}'}")

    def keep(self, n: int) -> None:
        """Stop assists until at most ``n`` run (the newest first)."""
        while len(self._procs) > n:
            self.stop(list(self._procs)[-1])

    def stop_all(self) -> None:
        self.keep(0)


def run(target: str, parameters: dict) -> None:
    """Import ``module:function`` and call it with ``parameters`` as keywords."""
    module, _, function = target.partition(":")
    getattr(importlib.import_module(module), function)(**parameters)


if __name__ == "__main__":
    run(sys.argv[1], json.loads(sys.argv[2]))
