"""`--existing-connections ask|accept`: on `kextless run capture` and passed through by `up`."""

from __future__ import annotations

import pytest

from kextless.actors.capture.core import ExistingMode
from kextless.actors.capture.main import parser
from kextless.deploy import cli
from kextless.deploy.options import UpOptions, parse_endpoint
from kextless.deploy.programs import ACTORS


def _capture_args(opts: UpOptions) -> list[str]:
    (spec,) = [a for a in ACTORS if a.name == "capture"]
    return spec.extra_args(opts, parse_endpoint("ipc:///tmp/klt-x.sock"))


def test_capture_defaults_to_ask_and_takes_accept() -> None:
    assert ExistingMode(parser().parse_args([]).existing_connections) is ExistingMode.ASK
    args = parser().parse_args(["--existing-connections", "accept"])
    assert ExistingMode(args.existing_connections) is ExistingMode.ACCEPT


def test_capture_refuses_other_modes() -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--existing-connections", "block"])


def test_up_passes_accept_to_capture_and_leaves_the_default_unsaid() -> None:
    assert "--existing-connections" not in _capture_args(UpOptions())
    args = _capture_args(UpOptions(existing_connections=ExistingMode.ACCEPT))
    assert args[-2:] == ["--existing-connections", "accept"]
    parser().parse_args(args)  # and capture takes it


def test_up_command_line_offers_exactly_the_capture_modes() -> None:
    assert set(cli.EXISTING_CHOICES) == {m.value for m in ExistingMode}
    up = cli._parser("up")
    assert up.parse_args([]).existing_connections == "ask"
    assert up.parse_args(["--existing-connections", "accept"]).existing_connections == "accept"
    with pytest.raises(SystemExit):
        up.parse_args(["--existing-connections", "maybe"])
