"""One temporary Prefect server for the flow tests that ask for it (``harness``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    import os

    pytest.importorskip("prefect")
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    with prefect_test_harness(server_startup_timeout=120):
        yield
