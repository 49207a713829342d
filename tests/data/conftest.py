"""Shared set-up for the data tests: the network marker and an isolated user cache."""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "network: reaches a package registry; runs only when "
                                       "TFORMER_TEST_NETWORK=1")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's ~/.cache."""
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("TFORMER_CACHE_DIR", str(cache))
    return cache
