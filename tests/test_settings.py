"""The configuration file (base/settings.py): every section decodes, and every mistake is
refused with one message naming the file and the key as the file spells it (pure, no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kextless.base.settings import Settings, SettingsError, load_settings, parse_settings

#: Every key, each set to something other than its default.
EVERY_KEY = """
[instance]
netns = "kxp2-cfg"
run_root = "run"
endpoint = "tcp://127.0.0.1:7000"
curve_server_secret = "keys/server.key_secret"
curve_clients = "/etc/kextless/clients"

[verdicts]
timeout = 2.5
default = "PermanentDrop"
no_client = "default"

[queues]
max_bytes = 1048576

[redirect]
nameserver_v4 = "10.9.0.53"
nameserver_v6 = "fd00::53"
nameserver_port = 5353
tunnel_port = 7717
split_tunnel_port = 7719

[capture]
existing_connections = "accept"
fail_open = true

[lifecycle]
enabled = false
udp_idle_timeout = 30

[bandwidth]
enabled = false
poll_interval = 0.5

[log]
level = "DEBUG"

[policy]
enabled = false
rules = "rules.toml"
watch = false
"""


def test_no_file_and_an_empty_file_are_the_defaults() -> None:
    assert load_settings(None) == Settings() == parse_settings("")
    d = Settings()
    assert (d.verdicts.timeout, d.verdicts.default, d.verdicts.no_client) == (10.0, "Block", "wait")
    assert d.instance.netns is None and d.instance.host is False
    assert d.policy.enabled and d.policy.rules is None and d.policy.watch


def test_every_section_decodes_and_relative_paths_follow_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "kextless.toml"
    conf.write_text(EVERY_KEY)
    s = load_settings(conf)
    base = tmp_path.resolve()
    assert s.instance.netns == "kxp2-cfg"
    assert s.instance.run_root == str(base / "run")
    assert s.instance.endpoint == "tcp://127.0.0.1:7000"
    assert s.instance.curve_server_secret == str(base / "keys/server.key_secret")
    assert s.instance.curve_clients == "/etc/kextless/clients"  # absolute stays
    assert (s.verdicts.timeout, s.verdicts.default, s.verdicts.no_client) == (
        2.5,
        "PermanentDrop",
        "default",
    )
    assert s.queues.max_bytes == 1 << 20
    r = s.redirect
    assert (r.nameserver_v4, r.nameserver_v6, r.nameserver_port) == ("10.9.0.53", "fd00::53", 5353)
    assert (r.tunnel_port, r.split_tunnel_port) == (7717, 7719)
    assert s.capture.existing_connections == "accept" and s.capture.fail_open
    assert not s.lifecycle.enabled and s.lifecycle.udp_idle_timeout == 30.0
    assert not s.bandwidth.enabled and s.bandwidth.poll_interval == 0.5
    assert s.log.level == "DEBUG"
    assert (s.policy.enabled, s.policy.rules, s.policy.watch) == (
        False,
        str(base / "rules.toml"),
        False,
    )


@pytest.mark.parametrize(
    "section", ["instance", "verdicts", "queues", "redirect", "capture", "lifecycle", "bandwidth",
                "log", "policy"],
)  # fmt: skip
def test_an_unknown_key_is_named_in_full(section: str) -> None:
    with pytest.raises(SettingsError) as e:
        parse_settings(f"[{section}]\ntypo_key = 1\n", "my.toml")
    message = str(e.value)
    assert message.startswith(f"my.toml: {section}.typo_key: unknown key (known here: ")
    assert "\n" not in message


def test_an_unknown_section_is_named() -> None:
    with pytest.raises(SettingsError, match=r"^f: verdict: unknown key \(known here: instance, "):
        parse_settings("[verdict]\ntimeout = 3\n", "f")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[instance]\nnetns = "../etc"', "instance.netns: '../etc' is not a valid namespace name"),
        ("[instance]\nhost = 1", "instance.host: Expected `bool`, got `int`"),
        ('[instance]\nnetns = "a"\nhost = true', "instance.netns and instance.host = true"),
        ('[instance]\nendpoint = "udp://x:1"', "instance.endpoint: 'udp://x:1': only ipc://"),
        ("[verdicts]\ntimeout = 0", "verdicts.timeout: Expected `float` > 0.0"),
        ("[verdicts]\ntimeout = 3601", "verdicts.timeout: Expected `float` <= 3600.0"),
        ('[verdicts]\ndefault = "Maybe"', "verdicts.default: Invalid enum value 'Maybe' (one of "),
        ('[verdicts]\nno_client = "drop"', "verdicts.no_client: Invalid enum value 'drop'"),
        ("[queues]\nmax_bytes = 10", "queues.max_bytes: Expected `int` >= 65536"),
        ('[redirect]\nnameserver_v4 = "::1"', "redirect.nameserver_v4: '::1' is not an IPv4"),
        ('[redirect]\nnameserver_v6 = "x"', "redirect.nameserver_v6: 'x' is not an IPv6"),
        ("[redirect]\nnameserver_port = 0", "redirect.nameserver_port: Expected `int` >= 1"),
        ("[redirect]\ntunnel_port = 70000", "redirect.tunnel_port: Expected `int` <= 65535"),
        ('[capture]\nexisting_connections = "x"', "capture.existing_connections: Invalid enum"),
        ('[capture]\nfail_open = "yes"', "capture.fail_open: Expected `bool`, got `str`"),
        ("[lifecycle]\nudp_idle_timeout = -1", "lifecycle.udp_idle_timeout: Expected `float` >"),
        ("[bandwidth]\npoll_interval = 60", "bandwidth.poll_interval: Expected `float` <= 25"),
        ('[log]\nlevel = "debug"', "log.level: Invalid enum value 'debug' (one of 'DEBUG'"),
        ("[policy]\nrules = 3", "policy.rules: Expected `str | null`, got `int`"),
        ('[policy]\nwatch = "no"', "policy.watch: Expected `bool`, got `str`"),
        ("verdicts = 3", "verdicts: Expected `object`, got `int`"),
        ("[verdicts\n", "not valid TOML"),
    ],
)
def test_a_bad_value_is_refused_naming_file_and_key(text: str, message: str) -> None:
    with pytest.raises(SettingsError) as e:
        parse_settings(text, "/etc/kextless.toml")
    assert str(e.value).startswith("/etc/kextless.toml: ")
    assert message in str(e.value)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"missing\.toml: cannot read: No such file"):
        load_settings(tmp_path / "missing.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[log]")
    with pytest.raises(SettingsError, match=r"binary\.toml: not UTF-8"):
        load_settings(binary)
