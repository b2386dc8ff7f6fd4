"""`kextless`: one command line for every tool and process. Each subcommand's module owns its
own arguments, so the dispatcher stays small and imports only what the subcommand needs."""

from __future__ import annotations

import importlib
import sys

_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "decode": (
        "kextless.protocol.dissect",
        "decode a captured info or command stream into JSON lines",
    ),
    "up": ("kextless.deploy.supervise", "start the whole system under supervisord"),
    "down": ("kextless.deploy.supervise", "stop everything `up` started"),
    "status": ("kextless.deploy.supervise", "show process states and broker counters"),
}
_ACTORS: dict[str, str] = {
    "broker": "kextless.broker.main",
    "ale": "kextless.actors.ale.main",
    "capture": "kextless.actors.capture.main",
    "policy": "kextless.actors.policy.main",
}

_USAGE = """usage: kextless <command> [args]

commands:
{commands}
  run ACTOR [args]  run one process in the foreground ({actors})

`kextless <command> --help` shows each command's arguments."""


def _usage() -> str:
    cmds = "\n".join(f"  {name:<16} {desc}" for name, (_, desc) in _SUBCOMMANDS.items())
    return _USAGE.format(commands=cmds, actors=", ".join(_ACTORS))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name == "run":
        if not rest or rest[0] not in _ACTORS:
            print(f"kextless run: choose an actor: {', '.join(_ACTORS)}", file=sys.stderr)
            return 2
        module = importlib.import_module(_ACTORS[rest[0]])
        return int(module.main(rest[1:]) or 0)
    if name not in _SUBCOMMANDS:
        print(f"kextless: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(_SUBCOMMANDS[name][0])
    if module.__name__ == "kextless.deploy.supervise":
        return int(module.main(name, rest) or 0)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
