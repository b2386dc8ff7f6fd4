"""`kextless monitor`: the connections the built-in policy has seen, live in the terminal or
once for scripts (`--once [--json]`).

It reads the snapshot the policy replaces about once a second (RUN/connections.json,
`actors/policy/view.py`) instead of opening a broker session, which the policy holds. Which
run directory: the one `kextless status` reads (`--netns`, `--run-root`, or the `[instance]`
section of `--config FILE`). The rows, sort, filter and totals are `monitor_rows.py`, pure;
the live screen is `monitor_app.py` (textual), imported only when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import msgspec

from kextless.actors.policy.view import (
    DECISIONS_FILE,
    SNAPSHOT_FILE,
    Decision,
    Snapshot,
    read_snapshot,
)
from kextless.base.rundir import RuntimeDir, default_root
from kextless.base.settings import SettingsError, load_settings
from kextless.deploy.errors import UsageError
from kextless.deploy.monitor_rows import (
    Column,
    StateFilter,
    ViewOptions,
    build_view,
    filter_decisions,
    parse_decisions,
    plain_decisions,
    plain_table,
    view_json,
)
from kextless.deploy.options import check_netns_name

PROG = "kextless monitor"
#: How much of the end of decisions.jsonl is read per refresh (~1,000 recent decisions).
DECISIONS_TAIL_BYTES = 256 * 1024


class SnapshotUnavailable(Exception):
    """No snapshot to show, with the reason a user can act on (one line)."""


def read_current(run: RuntimeDir) -> Snapshot:
    """The policy's latest snapshot, or SnapshotUnavailable saying why there is none."""
    path = run.path / SNAPSHOT_FILE
    try:
        return read_snapshot(path)
    except FileNotFoundError:
        if not run.path.is_dir():
            raise SnapshotUnavailable(
                f"no kextless instance at {run.path} (start one with `kextless up`, or give "
                "the --netns / --run-root it was started with)"
            ) from None
        raise SnapshotUnavailable(
            f"no snapshot at {path}: the built-in policy writes it about once a second - is it "
            "running (`kextless status`), or was the instance started with --no-policy?"
        ) from None
    except PermissionError:
        raise SnapshotUnavailable(
            f"cannot read {path}: permission denied (the run directory is its owner's only; "
            "run the monitor as the user that ran `kextless up`)"
        ) from None
    except OSError as exc:
        raise SnapshotUnavailable(f"cannot read {path}: {exc.strerror or exc}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SnapshotUnavailable(f"{path} is not a policy snapshot: {exc}") from None


def read_recent_decisions(run: RuntimeDir, max_bytes: int = DECISIONS_TAIL_BYTES) -> list[Decision]:
    """The last decisions the policy logged, oldest first; none when there is no log yet."""
    path = run.log_dir / DECISIONS_FILE
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read(max_bytes)
    except FileNotFoundError:
        if not run.path.is_dir():
            raise SnapshotUnavailable(
                f"no kextless instance at {run.path} (start one with `kextless up`, or give "
                "the --netns / --run-root it was started with)"
            ) from None
        return []
    except OSError as exc:
        raise SnapshotUnavailable(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_decisions(data, from_start=start == 0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Watch the connections the built-in policy decided: process, addresses, "
        "verdict, rule, bytes, age, end. Live (keys: s/S sort column, r reverse, / filter, "
        "l live/ended/all, d decision log, q quit) or once with --once [--json].",
    )
    p.add_argument("--netns", metavar="NAME", help="the instance's namespace (default: host)")
    p.add_argument(
        "--run-root",
        metavar="DIR",
        type=Path,
        help=f"parent of the per-instance run directories (default {default_root()})",
    )
    p.add_argument(
        "--config", metavar="FILE", type=Path, help="settings file ([instance] netns, run_root)"
    )
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--json", action="store_true", help="with --once: JSON rows and totals")
    p.add_argument(
        "--sort",
        choices=[c.value for c in Column],
        default=Column.AGE.value,
        help="the column to sort by (default age: youngest first)",
    )
    p.add_argument("--reverse", action="store_true", help="reverse the sort order")
    p.add_argument(
        "--decisions",
        action="store_true",
        help="the decision log (every verdict, reload updates too, newest first) instead of "
        "the connections; --filter applies",
    )
    p.add_argument(
        "--filter",
        metavar="TEXT",
        default="",
        help="show rows containing every word of TEXT (case-blind; !WORD: not containing it)",
    )
    p.add_argument(
        "--state",
        choices=[s.value for s in StateFilter],
        default=StateFilter.ALL.value,
        help="live, ended or all connections (default all)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="live view: how often to re-read the snapshot (default 1)",
    )
    return p


def resolve_run_dir(netns: str | None, run_root: Path | None, config: Path | None) -> RuntimeDir:
    """The command line wins over the config file's [instance], which wins over the default."""
    settings = load_settings(config)
    netns = netns if netns is not None else settings.instance.netns
    check_netns_name(netns)
    if run_root is None and settings.instance.run_root:
        run_root = Path(settings.instance.run_root)
    return RuntimeDir.for_instance(netns, run_root)


def _once_decisions(run: RuntimeDir, options: ViewOptions, as_json: bool) -> int:
    try:
        decisions = filter_decisions(read_recent_decisions(run), options.filter)
    except SnapshotUnavailable as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if as_json:
        sys.stdout.buffer.write(msgspec.json.encode(decisions) + b"\n")
        sys.stdout.flush()
    else:
        sys.stdout.write(plain_decisions(decisions))
    return 0


def _once(run: RuntimeDir, options: ViewOptions, as_json: bool) -> int:
    try:
        snapshot = read_current(run)
    except SnapshotUnavailable as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    view = build_view(snapshot, time.time(), options)
    if view.health.stale:
        print(f"{PROG}: warning: {view.health.line()}", file=sys.stderr)
    if as_json:
        sys.stdout.buffer.write(
            view_json(view, str(run.path), str(run.path / SNAPSHOT_FILE)) + b"\n"
        )
        sys.stdout.flush()
    else:
        sys.stdout.write(plain_table(view))
    return 0


def monitor_main(argv: list[str]) -> int:
    """`kextless monitor ARGS`: exit 0, 1 no snapshot (--once) or no terminal, 2 bad input."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the usage error or the help
        return int(e.code or 0)
    try:
        if args.json and not args.once:
            raise UsageError("--json needs --once (the live view is for a terminal)")
        if not 0.1 <= args.interval <= 60:
            raise UsageError(f"--interval {args.interval:g}: expected 0.1 to 60 seconds")
        run = resolve_run_dir(args.netns, args.run_root, args.config)
    except (UsageError, SettingsError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    options = ViewOptions(
        sort=Column(args.sort),
        reverse=args.reverse,
        filter=args.filter,
        state=StateFilter(args.state),
    )
    if args.once:
        if args.decisions:
            return _once_decisions(run, options, args.json)
        return _once(run, options, args.json)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print(f"{PROG}: the live view needs a terminal; use --once [--json]", file=sys.stderr)
        return 1
    try:
        from kextless.deploy.monitor_app import MonitorApp
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith(("textual", "rich")):
            raise
        print(
            f"{PROG}: the live view needs the textual package ({e.name} is missing: "
            "pip install 'textual>=8,<9'); --once [--json] works without it",
            file=sys.stderr,
        )
        return 1

    # A SIGINT outside the app's own key handling (ctrl+c is a key there) still ends quietly.
    with contextlib.suppress(KeyboardInterrupt):
        MonitorApp(run, options, interval=args.interval, decisions=args.decisions).run()
    return 0


if __name__ == "__main__":
    sys.exit(monitor_main(sys.argv[1:]))
