"""The whole system, once per module: `kextless up --netns` on the module's own `pair`
fixture (each module builds its namespaces its own way), with a 3 s verdict timeout."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netns import NetnsPair
from tests.system.harness import System


@pytest.fixture(scope="module")
def system(pair: NetnsPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    s = System(pair, tmp_path_factory.mktemp("run"), "--verdict-timeout", "3")
    try:
        yield s
    finally:
        s.close()
