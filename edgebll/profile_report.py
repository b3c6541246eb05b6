"""What ``edgebll profile`` shows of a profile (``RUN/profile.json``): the table it prints and ``RUN/profile.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_profile(profile: dict[str, Any], path: Path) -> str | None:
    """Bars per block (measured, estimated) and the device's budget line; None without matplotlib."""
    try:  # an optional dependency (the `plot` extra), and a slow import that `edgebll --help` must not pay
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    entries = profile["blocks"] + ([{**profile["bp"], "label": "bp"}] if profile.get("bp") else [])
    labels = [e.get("label") or (f"fb {e['index']}" if e["kind"] == "feedback" else f"block {e['index']}")
              for e in entries]
    mib = 2**20
    measured = [(e["measured_peak_bytes"] or 0) / mib for e in entries]
    estimated = [e["estimated_peak_bytes"] / mib for e in entries]
    allowance = (profile["device"]["budget_bytes"] - profile["baseline"]["rss_bytes"]) / mib
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(entries) + 2), 3.8))
    xs = range(len(entries))
    ax.bar([x - 0.2 for x in xs], measured, width=0.4, label="measured")
    ax.bar([x + 0.2 for x in xs], estimated, width=0.4, label="estimated")
    if allowance <= 4 * max(measured + estimated):
        ax.axhline(allowance, color="crimson", linestyle="--",
                   label=f"{profile['device']['name']} budget − idle runtime ({allowance:.0f} MiB)")
    else:
        ax.set_title(f"{profile['device']['name']} budget − idle runtime: {allowance:.0f} MiB (off the chart)",
                     fontsize=9, loc="right")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("peak memory above idle runtime (MiB)")
    ax.set_title(f"{profile['model']} · {profile['method']} · batch {profile['batch_size']}", fontsize=10, loc="left")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def format_profile_table(profile: dict[str, Any]) -> str:
    """The table ``edgebll profile`` prints."""
    mib = 2**20
    header = (f"{'block':>10}  {'measured':>9}  {'estimated':>9}  {'error':>7}  {'step':>8}  "
              f"fits {profile['device']['name']} (measured/estimated)")
    rows = [header]
    entries = profile["blocks"] + ([{**profile["bp"], "index": "bp", "kind": "forward"}] if profile.get("bp") else [])
    for e in entries:
        name = f"fb {e['index']}" if e["kind"] == "feedback" else f"{e['index']}{' (frozen)' if e.get('frozen') else ''}"
        if e["measured_peak_bytes"] is None:
            rows.append(f"{name:>10}  {'—':>9}  {e['estimated_peak_bytes'] / mib:>5.1f} MiB  {'':>7}  {'':>8}  "
                        f"no: {e['error']}")
            continue
        fits = "/".join("yes" if ok else "NO" for ok in (e["fits"], e["estimate_fits"]))
        rows.append(f"{name:>10}  {e['measured_peak_bytes'] / mib:>5.1f} MiB  {e['estimated_peak_bytes'] / mib:>5.1f} MiB  "
                    f"{e['error_percent']:>+6.1f}%  {e['step_ms']:>5.0f} ms  {fits}")
    base = profile["baseline"]
    rows.append(f"above an idle runtime of {base['rss_bytes'] / mib:.1f} MiB resident; device budget "
                f"{profile['device']['budget_bytes'] / mib:.0f} MiB; batch {profile['batch_size']}, {profile['codec']} "
                f"messages, {profile['steps']} steps per block")
    rows.append(f"(on the board itself, `idle_runtime_bytes = {base['rss_bytes']}` in its profile's TOML makes the "
                "exporter reserve this idle runtime instead of the default)")
    if profile["enforce_budget"] and profile["memory_pattern"]:
        rows.append("note: under the cap ORT skips its memory pattern when it cannot map it, so a block can measure "
                    "less here than it uses uncapped; the estimate counts the pattern")
    return "\n".join(rows)
