"""Which pydivert programs are attached in a namespace: a killed capture leaves its tc filters
behind, still run on every packet, so `up` warns about them and `down` reports them."""

from __future__ import annotations

import shutil
import subprocess

from kextless.deploy.errors import DeployError
from kextless.deploy.programs import ip_command


def divert_filters(netns: str) -> list[str]:
    """Every tc filter in the namespace that is a pydivert program (`tc_divert_*`)."""
    links = subprocess.run(
        [ip_command(), "-n", netns, "-o", "link", "show"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if links.returncode != 0:
        raise DeployError(f"cannot list interfaces of netns {netns}: {links.stderr.strip()}")
    found = []
    tc = shutil.which("tc") or "/usr/sbin/tc"
    for line in links.stdout.splitlines():
        ifname = line.split(":", 2)[1].strip().split("@", 1)[0]
        for hook in ("ingress", "egress"):
            res = subprocess.run(
                [tc, "-n", netns, "filter", "show", "dev", ifname, hook],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            found += [
                f"{ifname} {hook}: {f.strip()}" for f in res.stdout.splitlines() if "tc_divert" in f
            ]
    return found
