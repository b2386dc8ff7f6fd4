"""The connect-latency PNG: empirical CDFs, baseline vs each kextless instance, IPv4 and IPv6.

matplotlib (the `bench` extra) because it is the well-kept, standard plotting library; it is
imported only here, so the rest of the bench and kextless itself never need it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

_LABELS = {
    "baseline": "baseline (no kextless)",
    "client": "kextless, client over the endpoint",
    "policy": "kextless, embedded policy",
}


def connect_latency_png(dists: Mapping[str, Sequence[float]], path: Path, machine: str) -> None:
    """Write the PNG; `dists` maps `baseline_v4`, `client_v6`, ... to latencies in ms."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, fam in zip(axes, (4, 6), strict=True):
        counts = []
        for who, label in _LABELS.items():
            vals = sorted(dists.get(f"{who}_v{fam}", ()))
            if not vals:
                continue
            counts.append(len(vals))
            ys = [(i + 1) / len(vals) for i in range(len(vals))]
            ax.step(vals, ys, where="post", label=label)
        ax.set_xscale("log")
        n = f"n={min(counts)}" if counts and min(counts) == max(counts) else f"n={counts}"
        ax.set_title(f"connect() latency, IPv{fam} ({n} per curve)")
        ax.set_xlabel("ms (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.axhline(0.99, color="grey", lw=0.6, ls=":")
    axes[0].set_ylabel("fraction of connections at or below")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)  # below, off the curves
    fig.suptitle(f"kextless bench: connect latency, baseline vs kextless ({machine})", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
