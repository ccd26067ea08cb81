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


def _esc(value: object) -> str:
    """``value`` as HTML text; bytes that were not UTF-8 shown as U+FFFD."""
    import html

    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return html.escape(text)


def _errors_pane(errors: list[str]) -> "pn.pane.HTML":
    import panel as pn

    items = "".join(f"<li>{_esc(e[:500])}</li>" for e in errors)
    return pn.pane.HTML(f'<div class="rs-error" role="alert" style="background:#f8d7da;color:#842029;'
                        f'border:1px solid #f5c2c7;border-radius:4px;padding:6px 10px">'
                        f'<ul style="margin:0;padding-left:18px">{items}</ul></div>', sizing_mode="stretch_width")


def panel(results: "Results | str", *, tau: float | None = None, mode: str | None = None) -> "pn.Column":
    """The stored-results view: statistics heatmaps, tables, and the route of a chosen prompt.

    Everything read from the directory (its name, manifest fields, prompts, tokens, error
    messages) is shown escaped: the header is an HTML pane of escaped text (not Markdown, which
    passes HTML through), tables are DataFrame panes with ``escape=True``. A part that cannot be
    read (a corrupt manifest.json or failed.json, corrupt prompt files, statistics that fail) is
    listed in an error box and left out; the rest is still shown. Never raises for a bad directory.
    """
    import matplotlib.pyplot as plt
    import pandas as pd
    import panel as pn

    errors: list[str] = []

    def attempt(what: str, fn, default=None):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any unreadable part is reported and skipped
            errors.append(f"{what}: {type(exc).__name__}: {exc}")
            return default

    try:
        res = results if isinstance(results, Results) else Results(results)
    except Exception as exc:  # noqa: BLE001
        return pn.Column(_errors_pane([f"results {results}: {type(exc).__name__}: {exc}"]))
    m = attempt("manifest.json", lambda: res.manifest, {})
    if not isinstance(m, dict):
        errors.append(f"manifest.json: not a JSON object ({type(m).__name__})")
        m = {}
    failed = attempt("failed.json", lambda: res.failed, None)
    n_failed = len(failed) if isinstance(failed, list) else "?"  # ?: unreadable
    if failed is not None and not isinstance(failed, list):
        errors.append(f"failed.json: not a JSON array ({type(failed).__name__})")
    n_done = attempt("prompts", lambda: len(res), 0)
    problems = attempt("prompts", res.problems, {}) or {}
    for index, why in list(problems.items())[:20]:
        errors.append(f"prompt {index}: skipped: {why}")
    job_options = m.get("options", {})
    if not isinstance(job_options, dict):
        errors.append(f"manifest.json: options is not an object ({type(job_options).__name__})")
        job_options = {}

    header = pn.pane.HTML(
        f'<h3 class="rs-results-header">{_esc(res.path.name)}: {_esc(m.get("model"))} ({_esc(n_done)} prompts, '
        f"{_esc(n_failed)} failed, status {_esc(m.get('status'))})</h3>", sizing_mode="stretch_width")
    parts: list = [header]
    fig = attempt("statistics", lambda: plot_overview(res, tau=tau, mode=mode))
    if fig is not None:
        plt.close(fig)
        parts.append(pn.pane.Matplotlib(fig, tight=True, dpi=80))
    imp = attempt("importance", lambda: importance(res, tau=tau, mode=mode))
    tables = []
    if imp is not None:
        heads = imp[imp.kind == "head"].sort_values("weighted", ascending=False).head(20)
        tables.append(pn.Column("#### heads by weighted importance", pn.pane.DataFrame(heads, index=False, escape=True)))
    try:
        prev = previous_token(res, tau=tau, mode=mode).sort_values("prev_token", ascending=False).head(20)
    except (ValueError, TypeError):  # no attention sums (or only summaries)
        prev = None
    except Exception as exc:  # noqa: BLE001
        errors.append(f"previous-token heads: {type(exc).__name__}: {exc}")
        prev = None
    if prev is not None:
        tables.append(pn.Column("#### previous-token heads", pn.pane.DataFrame(prev, index=False, escape=True)))
    if tables:
        parts.append(pn.Row(*tables))
    prompts = attempt("prompt table", res.table)
    if prompts is not None and len(prompts):
        options = {f"{r['index']}: {str(r['prompt'])[:60]}": int(r["index"]) for _, r in prompts.iterrows()}
        select = pn.widgets.Select(name="prompt", options=options)

        def route_table(index: int):
            try:
                route = res.graph(index).route(job_options.get("tau", 0.04) if tau is None else tau,
                                               mode or job_options.get("mode", "renormalize"))
                return pn.pane.DataFrame(pd.DataFrame(route.records()), max_rows=40, escape=True)
            except Exception as exc:  # noqa: BLE001
                return _errors_pane([f"prompt {index}: {type(exc).__name__}: {exc}"])

        parts += [select, pn.bind(route_table, select)]
    if errors:
        parts.insert(1, _errors_pane(errors))
    return pn.Column(*parts)
