"""`--plot FILE`: % of the interleaved ceiling per op (x) and implementation (colour), one panel
per case, from the benchmark's results (the same dict as its JSON file).

HTML (plotly.js embedded, so the file opens offline) unless FILE ends in .png and kaleido is
installed. Also runs on a saved JSON file:

    python -m stochdepth.bench.plot results.json plot.html
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from stochdepth.bench import fused_rows, model_rows

__all__ = ["check_plot_path", "figure", "write_plot"]


def check_plot_path(path):
    """A reason why `path` cannot be written (plotly missing), or None. Checked before a run."""
    if importlib.util.find_spec("plotly") is None:
        return "--plot needs plotly (pip install plotly; it is in the bench extra)"
    return None


def figure(results):
    from plotly.subplots import make_subplots

    cases = [c for c in results.get("cases", []) if c.get("ops")]
    titles = [f"{c['name']}: {tuple(c['shape'])} {c['dtype']}"
              + (" (partly fits in cache)" if c.get("fits_in_cache") else "") for c in cases]
    has_fused = bool((results.get("fused") or {}).get("cases"))  # the fused ops' panel
    has_model = bool((results.get("model") or {}).get("cases"))  # the model section's panel
    if has_fused or has_model:
        titles = titles or ["no cases"]
    if has_fused:
        titles.append("fused ops: % of the copy-bandwidth ceiling (same rounds)")
    if has_model:
        titles.append("model train steps: x vs timm formula (same run)")
    panels = max(len(cases), 1) + has_fused + has_model
    fig = make_subplots(rows=panels, cols=1, subplot_titles=titles or ["no cases"],
                        vertical_spacing=0.25 / panels)
    import plotly.graph_objects as go

    shown = set()
    for i, case in enumerate(cases, start=1):
        by_label = {}
        for op, op_res in case["ops"].items():
            for row in op_res["rows"]:
                if row.get("pct_ceiling") is None:
                    continue
                by_label.setdefault(row["label"], []).append((op, row, op_res))
        for label, points in by_label.items():
            fig.add_trace(go.Bar(
                x=[op for op, _, _ in points],
                y=[row["pct_ceiling"] for _, row, _ in points],
                name=label, legendgroup=label, showlegend=label not in shown,
                hovertext=[f"{row['median_ms']:.4g} ms, {row['gbps']:.3g} GB/s; ceiling "
                           f"{o['ceiling']['gbps']:.3g} GB/s ({o['ceiling']['model']})"
                           for _, row, o in points]),
                row=i, col=1)
            shown.add(label)
        fig.add_hline(y=100, line_dash="dash", line_color="black", row=i, col=1)
        fig.update_yaxes(title_text="% of ceiling", row=i, col=1)
    if has_fused:
        fused_rows.add_plot_panel(fig, results, panels - has_model)
    if has_model:
        model_rows.add_plot_panel(fig, results, panels)
    device = results.get("device", "?")
    machine = results.get("machine", {})
    where = (machine.get("gpu", {}).get("name") if device == "cuda"
             else f"{machine.get('cpu_model')}, LLC {machine.get('llc', {}).get('text')}")
    fig.update_layout(
        barmode="group", height=380 * panels + 120,
        title=f"stochdepth benchmark ({device}: {where}, {machine.get('date_utc')}): % of the "
              "ceiling measured in the same rounds")
    return fig


def write_plot(results, path):
    """Writes the figure to `path`; returns the path written (HTML beside a .png path when
    kaleido is missing)."""
    fig = figure(results)
    if path.lower().endswith(".png"):
        if importlib.util.find_spec("kaleido") is not None:
            fig.write_image(path)
            return path
        html = os.path.splitext(path)[0] + ".html"
        print(f"--plot {path}: kaleido is not installed (PNG export needs it); wrote {html}",
              file=sys.stderr)
        path = html
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True)
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m stochdepth.bench.plot RESULTS.json OUT.html|OUT.png",
              file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        results = json.load(f)
    print(f"wrote {write_plot(results, argv[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
