"""Views of dataset statistics: matplotlib heatmaps and the Panel layout of a results directory.

The numbers come from ``cluster.stats`` (pure functions); this module only draws them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from routescope.cluster.results import Results
from routescope.cluster.stats import Source, head_matrix, importance, previous_token

if TYPE_CHECKING:
    import matplotlib.axes
    import matplotlib.figure
    import pandas as pd
    import panel as pn


def heatmap(table: "pd.DataFrame", value: str = "frequency", *, ax: "matplotlib.axes.Axes | None" = None,
            title: str | None = None, cmap: str | None = None, annotate_top: int = 0) -> "matplotlib.axes.Axes":
    """A layer x head heatmap of column ``value`` of an importance/compare/previous-token table;
    returns the Axes. Columns named ``*difference*`` get a diverging scale centred on 0."""
    import matplotlib.pyplot as plt

    m = head_matrix(table, value)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(3.0, 0.45 * m.shape[1] + 1.5), max(3.0, 0.22 * m.shape[0] + 1)))
    finite = m[np.isfinite(m)]
    if "difference" in value:
        lim = float(np.abs(finite).max()) if finite.size else 1.0
        im = ax.imshow(m, aspect="auto", cmap=cmap or "RdBu_r", vmin=-lim or -1, vmax=lim or 1, origin="lower")
    else:
        im = ax.imshow(np.where(np.isfinite(m), m, np.nan), aspect="auto", cmap=cmap or "viridis", origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(m.shape[1]))
    ax.set_title(title or value)
    ax.figure.colorbar(im, ax=ax, fraction=0.05)
    if annotate_top:
        flat = np.where(np.isfinite(m), m, -np.inf).reshape(-1)
        for k in np.argsort(-flat)[:annotate_top]:
            ax.text(k % m.shape[1], k // m.shape[1], "*", ha="center", va="center", color="red")
    return ax


def plot_overview(source: Source, *, tau: float | None = None, mode: str | None = None) -> "matplotlib.figure.Figure":
    """A figure: importance frequency, weighted importance, previous-token score, FFN bars."""
    import matplotlib.pyplot as plt

    imp = importance(source, tau=tau, mode=mode)
    try:
        prev = previous_token(source, tau=tau, mode=mode)
    except (ValueError, TypeError):  # no attention sums (or only summaries): three panels
        prev = None
    n = 4 if prev is not None else 3
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 5.5))
    heatmap(imp, "frequency", ax=axes[0], title="importance frequency")
    heatmap(imp, "weighted", ax=axes[1], title="contribution-weighted")
    if prev is not None:
        heatmap(prev, "prev_token", ax=axes[2], title="previous-token score", cmap="magma")
    ffn = imp[imp.kind == "ffn"]
    ax = axes[-1]
    ax.barh(ffn["layer"], ffn["frequency"], color="lightgray", label="frequency")
    ax.barh(ffn["layer"], ffn["weighted"], color="tab:blue", label="weighted")
    ax.set_xlabel("FFN importance")
    ax.set_ylabel("layer")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def panel(results: "Results | str", *, tau: float | None = None, mode: str | None = None) -> "pn.Column":
    """The stored-results view: statistics heatmaps, tables, and the route of a chosen prompt."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import panel as pn

    res = results if isinstance(results, Results) else Results(results)
    fig = plot_overview(res, tau=tau, mode=mode)
    plt.close(fig)
    imp = importance(res, tau=tau, mode=mode)
    heads = imp[imp.kind == "head"].sort_values("weighted", ascending=False).head(20)
    try:
        prev = previous_token(res, tau=tau, mode=mode).sort_values("prev_token", ascending=False).head(20)
    except (ValueError, TypeError):
        prev = None
    prompts = res.table()
    options = {f"{r['index']}: {str(r['prompt'])[:60]}": int(r["index"]) for _, r in prompts.iterrows()}
    select = pn.widgets.Select(name="prompt", options=options)
    m = res.manifest
    job_options = m.get("options", {})

    def route_table(index: int) -> "pn.pane.DataFrame":
        route = res.graph(index).route(job_options.get("tau", 0.04) if tau is None else tau,
                                       mode or job_options.get("mode", "renormalize"))
        return pn.pane.DataFrame(pd.DataFrame(route.records()), max_rows=40)

    header = pn.pane.Markdown(
        f"### {res.path.name}: {m.get('model')} ({len(res)} prompts, {len(res.failed)} failed, "
        f"status {m.get('status')})")
    return pn.Column(
        header, pn.pane.Matplotlib(fig, tight=True, dpi=80),
        pn.Row(pn.Column("#### heads by weighted importance", pn.pane.DataFrame(heads, index=False)),
               *([pn.Column("#### previous-token heads", pn.pane.DataFrame(prev, index=False))] if prev is not None else [])),
        select, pn.bind(route_table, select),
    )
