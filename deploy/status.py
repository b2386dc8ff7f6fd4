"""`kextless status`: supervisord's view of every program plus the broker's own counters, asked
through the public KextClient like any other client (without opening a session, which the
policy may hold); each interface of the namespace with its guarded hooks, read from its tc
filters (an unguarded one means packets pass kextless unseen: degraded); and the divert loss
counters the capture reports through the ALE, with the time each last rose.

The text is short by default (`format_status`): processes, interfaces, the client session,
connections, decisions and, only when something went wrong, what (`problems`); `verbose=True`
adds every counter. The JSON report always has everything."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kextless.actors.capture.counters import KERNEL_PREFIX, LAST_RISE, LOSS_COUNTERS, PREFIX
from kextless.base.rundir import RuntimeDir
from kextless.broker.client import KextClient, KextError, KextTimeout
from kextless.deploy.errors import DeployError
from kextless.deploy.filters import interface_coverage
from kextless.deploy.instance import Instance, instance_name, read_instance
from kextless.deploy.options import check_netns_name
from kextless.deploy.supervisor_rpc import RPC_ERRORS, rpc, supervisord_alive
from kextless.deploy.watchdog import STATE_FILE as WATCHDOG_STATE_FILE

STATUS_TIMEOUT = 2.0
#: The capture reports every 5 s; three missed reports mean its counters are out of date.
STALE_S = 15.0


def broker_counters(
    inst: Instance, timeout: float = STATUS_TIMEOUT, client_cert: Path | None = None
) -> dict[str, Any]:
    """The broker's counters (request `S`); DeployError with the reason when it cannot say."""
    url = inst.client_url
    if url.startswith("ipc://") and not Path(url[len("ipc://") :]).is_socket():
        raise DeployError(f"the broker is not listening: {url[len('ipc://') :]} does not exist")
    server_cert = None  # only a tcp endpoint has CURVE; an ipc one ignores --curve-*
    if url.startswith("tcp://"):
        if client_cert is None or not inst.curve_server_secret:
            raise DeployError("a tcp endpoint needs --curve-client-secret FILE to ask the broker")
        server_cert = Path(inst.curve_server_secret)
    try:
        client = KextClient(
            url,
            request_timeout=timeout,
            curve_server_cert=server_cert,
            curve_client_cert=client_cert if server_cert is not None else None,
        )
    except ValueError as e:  # the certificates could not be loaded
        raise DeployError(str(e)) from None
    try:
        return client.stats()
    except KextTimeout:
        raise DeployError(f"the broker did not answer on {url} within {timeout:g} s") from None
    except KextError as e:
        raise DeployError(str(e)) from None
    finally:
        client.close_sockets()


def status(
    netns: str | None = None, run_root: Path | None = None, client_cert: Path | None = None
) -> tuple[int, dict[str, Any]]:
    """(exit code, report): 0 all RUNNING and the broker answered, 1 degraded, 3 not running."""
    check_netns_name(netns)
    run = RuntimeDir.for_instance(netns, run_root)
    inst = read_instance(run)
    report: dict[str, Any] = {
        "netns": netns,
        "run_dir": str(run.path),
        "running": False,
        "programs": [],
        "broker": None,
        "broker_error": None,
        "interfaces": [],
        "interfaces_error": None,
        "divert_counters": None,
    }
    if inst is None or not supervisord_alive(run):
        report["broker_error"] = "not running"
        return 3, report
    report.update(running=True, endpoint=inst.client_url)
    try:
        infos = rpc(run).supervisor.getAllProcessInfo()
    except RPC_ERRORS as e:
        report["broker_error"] = f"supervisord stopped answering: {e}"
        return 1, report
    order = list(inst.programs)  # start order, as `up` wrote it
    infos.sort(key=lambda i: order.index(i["name"]) if i["name"] in order else len(order))
    for info in infos:
        up_s = max(0, info["now"] - info["start"]) if info["statename"] == "RUNNING" else None
        record = inst.programs.get(info["name"])
        first_pid = record.pid if record is not None else 0
        report["programs"].append(
            {
                "name": info["name"],
                "state": info["statename"],
                "pid": info["pid"] or None,
                "uptime_s": up_s,
                "description": info["description"],
                # supervisord restarted it since `up` saw it RUNNING (it crashed or exited).
                "restarted": bool(first_pid and info["pid"] and info["pid"] != first_pid),
            }
        )
    code = 0 if all(p["state"] == "RUNNING" for p in report["programs"]) else 1
    try:
        report["broker"] = broker_counters(inst, client_cert=client_cert)
    except DeployError as e:
        report["broker_error"] = str(e)
        code = 1
    else:
        report["divert_counters"] = divert_counters(report["broker"])
        capture = report["broker"].get("actors", {}).get("capture")
        if report["divert_counters"] is not None and isinstance(capture, dict):
            report["divert_counters_age_s"] = capture.get("last_seen_s_ago")
    report["watchdog"] = watchdog_state(run)
    # Only an instance with a capture guards its namespace; without one nothing is expected.
    guarding = "capture" in inst.programs
    try:
        report["interfaces"] = interfaces(netns)
    except DeployError as e:
        report["interfaces_error"] = str(e)
        code = 1 if guarding else code
    if guarding and any(not i["closed"] for i in report["interfaces"]):
        code = 1
    return code, report


def watchdog_state(run: RuntimeDir) -> dict[str, Any] | None:
    """The watchdog's counters (RUN/watchdog.json: kills of hung processes), or None."""
    try:
        data = json.loads((run.path / WATCHDOG_STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def interfaces(netns: str | None) -> list[dict[str, Any]]:
    """Each interface of the namespace and whether divert programs sit on its hooks."""
    return [
        {
            "name": c.ifname,
            "index": c.index,
            "kind": c.kind,
            "up": c.up,
            "ingress": c.ingress,
            "egress": c.egress,
            "guarded": c.guarded,
            "held_ingress": c.held_ingress,
            "held_egress": c.held_egress,
            "closed": c.closed,
        }
        for c in interface_coverage(netns)
    ]


def divert_counters(broker: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The capture's loss counters from the broker's S (`actors.capture.counters`), each with
    the time it last rose (None: never); None when the capture has not reported yet."""
    capture = broker.get("actors", {}).get("capture")
    counters = capture.get("counters") if isinstance(capture, dict) else None
    if not isinstance(counters, dict) or not counters:
        return None
    out: dict[str, dict[str, Any]] = {}
    for key in LOSS_COUNTERS:
        rose = counters.get(PREFIX + key + LAST_RISE) or 0
        out[key] = {
            "count": int(counters.get(PREFIX + key, 0)),
            "last_rise": (
                time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rose)) if rose else None
            ),
        }
    return out


#: The actors `up` waits for, in the order it reports them; any other program (a test's
#: stand-in) only has to be RUNNING.
READY_ACTORS = ("ale", "capture", "lifecycle", "bandwidth", "policy")


def reported(broker: Mapping[str, Any], name: str, pid: int) -> dict[str, Any] | None:
    """The actor's entry in the broker's S if the running process (`pid`) itself reported;
    an entry of a predecessor supervisord since replaced does not count."""
    entry = broker.get("actors", {}).get(name)
    if not isinstance(entry, dict) or (pid and entry.get("pid") != pid):
        return None
    return entry


def not_ready(
    pids: Mapping[str, int],
    broker: Mapping[str, Any] | None,
    interfaces: Sequence[Mapping[str, Any]] | None,
) -> dict[str, str]:
    """What of an instance is not ready yet, {actor: why} (empty: all of it is), from the
    RUNNING programs' pids, the broker's S (None: it did not answer) and `interfaces()`
    (None: not read). Ready means each actor's first report after its start work: the
    capture's first Health follows its divert handle and link guard, the lifecycle actor's
    its FLOW/SOCKET handles, the bandwidth actor's its loop (and, with the kernel flow
    cache, its finding the capture's counter maps); the policy is ready once a session is
    open; every interface must be diverted on both hooks (held is not enough: its
    connections would be dropped, not decided)."""
    awaited = [n for n in READY_ACTORS if n in pids]
    if not awaited:
        return {}
    if broker is None:
        return dict.fromkeys(awaited, "the broker does not answer yet")
    out: dict[str, str] = {}
    if "ale" in pids and reported(broker, "ale", pids["ale"]) is None:
        out["ale"] = "has not reported to the broker yet"
    capture = reported(broker, "capture", pids.get("capture", 0))
    if "capture" in pids:
        if capture is None or not capture.get("counters"):
            out["capture"] = "no divert handle yet (its first report has not arrived)"
        elif interfaces is None:
            out["capture"] = "the namespace's interfaces could not be read"
        else:
            bad = [
                f"{i['name']} "
                + " ".join(f"{hook} {_hook_state(dict(i), hook)}" for hook in ("ingress", "egress"))
                for i in interfaces
                if not i["guarded"]
            ]
            if bad:
                out["capture"] = "interface(s) not diverted on both hooks: " + ", ".join(bad)
    if "lifecycle" in pids and reported(broker, "lifecycle", pids["lifecycle"]) is None:
        out["lifecycle"] = "its FLOW/SOCKET handles are not open yet (no report)"
    if "bandwidth" in pids:
        bandwidth = reported(broker, "bandwidth", pids["bandwidth"])
        counters = (capture or {}).get("counters") or {}
        kernel_cache = any(str(k).startswith(KERNEL_PREFIX) for k in counters)
        if bandwidth is None:
            out["bandwidth"] = "has not reported to the broker yet"
        elif "capture" in pids and not counters:
            out["bandwidth"] = "waits for the capture's counter maps"
        elif kernel_cache and not (bandwidth.get("counters") or {}).get("maps_found"):
            out["bandwidth"] = "not reading the capture's counter maps yet"
    if "policy" in pids and broker.get("session", {}).get("state") != "open":
        out["policy"] = "has no client session open yet"
    return out


def _hook_state(i: dict[str, Any], hook: str) -> str:
    if i[hook]:
        return "guarded"
    return "held" if i.get(f"held_{hook}") else "UNGUARDED"


def format_status(report: dict[str, Any], verbose: bool = False) -> str:
    """Human-readable status: one line per program and interface, the session, connections,
    decisions and what went wrong (about 15-25 lines); `verbose` adds every counter."""
    where = instance_name(report["netns"])
    if not report["running"]:
        return f"kextless is not running for {where} ({report['run_dir']})"
    lines = [f"kextless for {where}: run dir {report['run_dir']}, endpoint {report['endpoint']}"]
    for p in report["programs"]:
        uptime = "" if p["uptime_s"] is None else f"  uptime {_hms(p['uptime_s'])}"
        pid = f"pid {p['pid']}" if p["pid"] else "-"
        restarted = "  (restarted since up)" if p.get("restarted") else ""
        lines.append(f"  {p['name']:<10} {p['state']:<9} {pid}{uptime}{restarted}")
    _interface_lines(report, lines)
    if verbose:  # every counter, exactly as status always printed them
        _counter_lines(report, lines)
        return "\n".join(lines)
    if report["broker"] is not None:
        lines += summary_lines(report["broker"])
    else:
        lines.append(f"broker: DOWN ({report['broker_error']})")
    found = problems(report)
    if found:
        lines.append("problems:")
        lines += [f"  {p}" for p in found]
    else:
        lines.append("problems: none")
    lines.append("(every counter: kextless status --verbose; all of it as JSON: --json)")
    return "\n".join(lines)


def _interface_lines(report: dict[str, Any], lines: list[str]) -> None:
    if report.get("interfaces_error"):
        lines.append(f"interfaces: UNKNOWN ({report['interfaces_error']})")
    elif report.get("interfaces"):
        lines.append("interfaces (divert programs on ingress / egress):")
        for i in report["interfaces"]:
            hooks = " ".join(f"{hook} {_hook_state(i, hook)}" for hook in ("ingress", "egress"))
            if i["guarded"]:
                flag = ""
            elif i.get("closed"):
                flag = "  <- held: IP dropped by the fail-closed guard until diverted"
            else:
                flag = "  <- UNGUARDED: its packets pass kextless unseen"
            state = "up" if i["up"] else "down"
            lines.append(f"  {i['name']:<10} {i['kind']:<8} {state:<4} {hooks}{flag}")


def _counter_lines(report: dict[str, Any], lines: list[str]) -> None:
    """Every counter, as `status` always printed them (the verbose part)."""
    if report.get("divert_counters") is not None:
        age = report.get("divert_counters_age_s")
        if isinstance(age, int | float):
            stale = "; STALE: the capture stopped reporting" if age > STALE_S else ""
            lines.append(f"divert loss counters (capture, reported {age:.1f} s ago{stale}):")
        else:
            lines.append("divert loss counters (capture):")
        for key, c in report["divert_counters"].items():
            when = f"last rose {c['last_rise']}" if c["last_rise"] else "never rose"
            lines.append(f"  {key}: {c['count']} ({when})")
    if report["broker"] is not None:
        lines.append("broker counters:")
        lines += [f"  {k}: {v}" for k, v in _flatten(report["broker"])]
    else:
        lines.append(f"broker: DOWN ({report['broker_error']})")


def _num(tree: dict[str, Any], *path: str) -> int:
    """The number at `path` in the broker's counters (0 when absent or not a number)."""
    node: Any = tree
    for key in path:
        if not isinstance(node, dict):
            return 0
        node = node.get(key)
    return int(node) if isinstance(node, int | float) and not isinstance(node, bool) else 0


def _ale(broker: dict[str, Any]) -> dict[str, Any]:
    ale = broker.get("actors", {}).get("ale")
    counters = ale.get("counters") if isinstance(ale, dict) else None
    return counters if isinstance(counters, dict) else {}


def _by_verdict(ale: dict[str, Any]) -> str:
    decided = sorted(
        ((k.removeprefix("decided."), int(v)) for k, v in ale.items() if k.startswith("decided.")),
        key=lambda kv: -kv[1],
    )
    return ", ".join(f"{name} {n}" for name, n in decided if n)


def summary_lines(broker: dict[str, Any]) -> list[str]:
    """The short view of the broker's counters: client session, connections, decisions."""
    session = broker.get("session", {})
    state = session.get("state", "?")
    if state == "open":
        reader = "a reader waits" if session.get("reader_waiting") else "no read waiting"
        client = f"client: session open ({reader})"
    elif state == "shut":
        client = "client: shut down (Shutdown received; the client has not closed yet)"
    else:
        client = "client: none connected"
    mode = broker.get("no_client", {}).get("mode")
    if state != "open" and mode:
        client += (
            "; new connections get the default verdict at once (--no-client default)"
            if mode == "default"
            else "; new connections wait for one, up to the verdict timeout"
        )
    ale = _ale(broker)
    rtt = broker.get("verdict_rtt_us", {})
    lines = [client + f" [{_num(session, 'opened')} session(s) since start]"]
    live = broker.get("connections_tracked")
    pending = broker.get("pending_verdicts")
    lines.append(
        f"connections: {'?' if live is None else int(live)} tracked, "
        f"{'?' if pending is None else int(pending)} waiting for a verdict, "
        f"{_num(ale, 'ids_issued')} asked"
    )
    withdrawn = sum(
        _num(broker, "infos", "withdrawn", k) for k in ("ConnectionIpv4", "ConnectionIpv6")
    )
    parts = [
        f"{_num(ale, 'verdicts')} by the client",
        f"{_num(ale, 'timeouts')} by verdict timeout",
        f"{_num(ale, 'refused')} refused at once",
    ]
    if _num(ale, "shed"):
        parts.append(f"{_num(ale, 'shed')} dropped unasked (overload)")
    lines.append("decisions: " + ", ".join(parts))
    by_verdict = _by_verdict(ale)
    if by_verdict:
        lines.append(f"  by verdict: {by_verdict}")
    if withdrawn:
        lines.append(
            f"  {withdrawn} decided by timeout before any client read them (not handed out)"
        )
    if isinstance(rtt, dict) and rtt.get("samples"):
        lines.append(
            f"  verdict latency: p50 {rtt['p50'] / 1000:.2f} ms, p99 {rtt['p99'] / 1000:.2f} ms "
            f"({rtt['samples']} samples)"
        )
    return lines


def problems(report: dict[str, Any]) -> list[str]:
    """Everything that went wrong, one line each (empty: nothing did)."""
    out: list[str] = []
    logs = f"{report['run_dir']}/logs"
    for p in report.get("programs", []):
        if p["state"] != "RUNNING":
            out.append(f"{p['name']} is {p['state']} (see {logs}/{p['name']}.log)")
        elif p.get("restarted"):
            out.append(f"{p['name']} was restarted since up (see {logs}/{p['name']}.log)")
    if report.get("broker_error") and report.get("broker") is None:
        out.append(f"the broker did not answer: {report['broker_error']}")
    if report.get("interfaces_error"):
        out.append(f"interfaces unknown: {report['interfaces_error']}")
    for i in report.get("interfaces", []):
        if not i["guarded"] and not i.get("closed"):
            out.append(f"interface {i['name']} is UNGUARDED: its packets pass kextless unseen")
    dog = report.get("watchdog") or {}
    if isinstance(dog.get("kills"), int) and dog["kills"] > 0:
        last = dog.get("last") or {}
        out.append(
            f"the watchdog killed {dog['kills']} hung process(es), last {last.get('name')} "
            f"pid {last.get('pid')} (see {logs}/watchdog.log)"
        )
    age = report.get("divert_counters_age_s")
    if isinstance(age, int | float) and age > STALE_S:
        out.append(f"the capture stopped reporting its counters ({age:.0f} s ago)")
    for key, c in (report.get("divert_counters") or {}).items():
        if c["count"]:
            out.append(
                f"{key}: {c['count']} packet(s) {LOSS_COUNTERS.get(key, '')}"
                f" (last rose {c['last_rise']})"
            )
    broker = report.get("broker")
    if not isinstance(broker, dict):
        return out
    ale = _ale(broker)
    checks = [
        (
            _num(ale, "timeouts"),
            f"verdict timeout(s): no verdict in time, got the default (see {logs}/ale.log)",
        ),
        (
            _num(ale, "refused"),
            f"connection info(s) refused (queue full or no client), got the default at once "
            f"(see {logs}/ale.log)",
        ),
        (
            _num(ale, "shed"),
            "packet(s) dropped unasked: verdicts.max_pending were already waiting for a "
            f"verdict (overload; see {logs}/ale.log)",
        ),
        (
            _num(ale, "verdicts_unknown_id"),
            "verdict(s) for an unknown id (late after a timeout, or twice)",
        ),
        (_num(ale, "updates_unknown"), "Update(s) for a connection kextless does not know"),
    ]
    commands = broker.get("commands", {})
    malformed = sum(_num(c, "malformed") for c in commands.values() if isinstance(c, dict))
    malformed += _num(broker, "malformed_unknown_type")
    unhandled = sum(_num(c, "unhandled") for c in commands.values() if isinstance(c, dict))
    infos_dropped = sum(
        _num(broker, "infos", "dropped", k) for k in broker.get("infos", {}).get("dropped", {})
    )
    checks += [
        (malformed, f"malformed command(s) refused (see {logs}/broker.log)"),
        (unhandled, f"command(s) refused: no actor handles them (see {logs}/broker.log)"),
        (_num(broker, "frame_errors"), f"malformed request(s) refused (see {logs}/broker.log)"),
        (
            _num(broker, "session", "busy_refused"),
            "open(s) refused: another client had the session",
        ),
        (infos_dropped, "bandwidth/log/end info(s) dropped: the info queue was full"),
        (
            _num(broker, "reads", "undelivered"),
            "read reply(ies) the reader was gone for (put back)",
        ),
        (_num(broker, "actor_garbage"), f"actor message(s) dropped (see {logs}/broker.log)"),
        (
            _num(broker, "log_ring", "overwritten"),
            "log line(s) overwritten before GetLogs fetched them",
        ),
    ]
    out += [f"{n} {what}" for n, what in checks if n]
    return out


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested counters as dotted keys (`queue.depth: 3`), in the broker's own order."""
    flat: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat += _flatten(value, f"{prefix}{key}.")
        else:
            flat.append((f"{prefix}{key}", value))
    return flat


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
