"""The whole system, once per module: `kextless up --netns` on the module's own `pair`
fixture (each module builds its namespaces its own way), with a 3 s verdict timeout; and a
test client answering it (a module that needs other answers overrides `answerer`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netns import NetnsPair
from tests.system.harness import Answerer, System


@pytest.fixture(scope="module")
def system(pair: NetnsPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    s = System(pair, tmp_path_factory.mktemp("run"), "--verdict-timeout", "3")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture()
def answerer(system: System) -> Iterator[Answerer]:
    a = Answerer(system.endpoint).start()
    try:
        yield a
    finally:
        a.stop()
        print(system.logs())  # shown by pytest only when the test failed
        assert not a.errors, a.errors
