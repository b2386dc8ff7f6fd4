"""`kextless status`: supervisord's view of every program plus the broker's own counters, asked
through the public KextClient like any other client (without opening a session, which the
policy may hold); each interface of the namespace with its guarded hooks, read from its tc
filters (an unguarded one means packets pass kextless unseen: degraded); and the divert loss
counters the capture reports through the ALE, with the time each last rose."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kextless.actors.capture.counters import LAST_RISE, LOSS_COUNTERS, PREFIX
from kextless.base.rundir import RuntimeDir
from kextless.broker.client import KextClient, KextError, KextTimeout
from kextless.deploy.errors import DeployError
from kextless.deploy.filters import interface_coverage
from kextless.deploy.instance import Instance, instance_name, read_instance
from kextless.deploy.options import check_netns_name
from kextless.deploy.supervisor_rpc import RPC_ERRORS, rpc, supervisord_alive

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
        report["programs"].append(
            {
                "name": info["name"],
                "state": info["statename"],
                "pid": info["pid"] or None,
                "uptime_s": up_s,
                "description": info["description"],
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


def _hook_state(i: dict[str, Any], hook: str) -> str:
    if i[hook]:
        return "guarded"
    return "held" if i.get(f"held_{hook}") else "UNGUARDED"


def format_status(report: dict[str, Any]) -> str:
    """Human-readable status: one line per program, then the broker's counters."""
    where = instance_name(report["netns"])
    if not report["running"]:
        return f"kextless is not running for {where} ({report['run_dir']})"
    lines = [f"kextless for {where}: run dir {report['run_dir']}, endpoint {report['endpoint']}"]
    for p in report["programs"]:
        uptime = "" if p["uptime_s"] is None else f"  uptime {_hms(p['uptime_s'])}"
        pid = f"pid {p['pid']}" if p["pid"] else "-"
        lines.append(f"  {p['name']:<10} {p['state']:<9} {pid}{uptime}")
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
    return "\n".join(lines)


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
