"""Fixtures that several test modules share."""
import pytest


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """esmerge's cache (weight-hash memos, converted bases, intermediates) in a temporary folder for the
    whole module, so that no test reads or writes the user's; yields that folder."""
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("cache")
    mp.setenv("ESMERGE_CACHE", str(folder))
    yield folder
    mp.undo()
