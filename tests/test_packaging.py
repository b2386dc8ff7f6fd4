"""pyproject.toml names every package explicitly (the folders are mapped under the kextless
namespace), so a new subpackage left out of that list would be missing from a wheel while
the editable install still found it. This keeps the list and the folders in step."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed_under_the_kextless_namespace() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = tool["package-dir"]  # {"kextless.protocol": "protocol", ...}
    folders = {
        name + "".join("." + part for part in init.parent.relative_to(ROOT / folder).parts)
        for name, folder in mapped.items()
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert set(tool["packages"]) == folders
    assert set(mapped.values()) == {"protocol", "base", "broker", "actors", "deploy"}
