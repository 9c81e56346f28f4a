"""One real `medserve serve` subprocess with the default model for the whole e2e session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.serverproc import Server, running_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "medserve.log"
    with running_server(log) as s:
        yield s
