"""The plots of ``report.html``, drawn by matplotlib as SVG text to inline in the page.

This module imports matplotlib, and only the report writers import this module (inside their functions), so
that the command line starts without it. The figures use matplotlib's object API (no pyplot, so no global
backend is chosen or changed). The SVG keeps its text as text (``svg.fonttype`` none: no glyph outlines, no
font files) and loses its XML prologue and namespace declarations, which an ``<svg>`` inside HTML does
without; what is left names no URL, so the page opens offline. The ids that remain (clip paths, markers) come
from a hash of their content with a fixed salt: the same report gives the same SVG, and two plots in one page
cannot give one id two meanings.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import matplotlib
from matplotlib.figure import Figure

PASSED_COLOR = "#2e7d32"
FAILED_COLOR = "#c62828"
SVG_SETTINGS = {
    "svg.fonttype": "none",
    "svg.hashsalt": "nanoexport",
    # The browser picks the first of these it has: the page carries no font.
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial", "Liberation Sans", "sans-serif"],
    "font.size": 9,
}
# The XML declaration and DOCTYPE before <svg>, and the namespace declarations, which inline SVG does without.
_PROLOGUE = re.compile(r"^.*?(?=<svg)", re.DOTALL)
_NAMESPACES = re.compile(r'\s+xmlns(:\w+)?="[^"]*"')
_ID = re.compile(r'\s+id="([^"]*)"')
_REFERENCE = re.compile(r'#([^\s")]+)')


def svg_text(figure: Figure) -> str:
    """``figure`` as an ``<svg>`` element to put in an HTML page: no prologue, metadata or URLs."""
    buffer = io.StringIO()
    with matplotlib.rc_context(SVG_SETTINGS):
        figure.savefig(buffer, format="svg", bbox_inches="tight",
                       metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    svg = _NAMESPACES.sub("", _PROLOGUE.sub("", buffer.getvalue(), count=1))
    # matplotlib numbers its groups from 1 in every figure (figure_1, axes_1): ids that would repeat in a page
    # of several plots. Only the clip paths and markers are referred to (by hashed ids); the rest go.
    referenced = set(_REFERENCE.findall(svg))
    return _ID.sub(lambda match: match.group(0) if match.group(1) in referenced else "", svg)


def _figure(width: float, height: float) -> Figure:
    """A figure to draw on inside ``rc_context(SVG_SETTINGS)``: its text takes the fonts set there."""
    return Figure(figsize=(width, height), layout="constrained")


def position_errors(logits_error: Sequence[dict[str, Any]], kv_error: Sequence[dict[str, Any]]) -> str:
    """Validation's error per token position, one line per prompt: the logits' max-abs and 1 - cosine against
    the reference, and the KV-cache path's max-abs against one full forward (decode steps after the dotted
    line). Takes ``ValidationReport``'s ``logits_error_by_position`` and ``kv_error_by_position``."""
    with matplotlib.rc_context(SVG_SETTINGS):
        figure = _figure(10, 2.8)
        panels = figure.subplots(1, 3)
        for index, prompt in enumerate(logits_error):
            panels[0].plot(prompt["max_abs"], marker=".", label=f"prompt {index + 1}")
            panels[1].plot(prompt["one_minus_cosine"], marker=".")
        for prompt in kv_error:
            panels[2].plot(prompt["max_abs"], marker=".")
            panels[2].axvline(prompt["prefill"] - 0.5, color="grey", linestyle=":", linewidth=1)
        titles = ("logits max-abs error vs reference", "logits 1 - cosine vs reference",
                  "KV path max-abs vs full forward")
        for panel, title in zip(panels, titles):
            panel.set_title(title)
            panel.set_xlabel("token position")
            panel.grid(alpha=0.3)
        if logits_error:
            panels[0].legend(fontsize=7)
        return svg_text(figure)


def checks(report_checks: Sequence[dict[str, Any]]) -> str:
    """One row per gated check: its value as a dot (green passed, red failed) and its threshold as a dashed line
    between a passing and a failing side. Each row spans its value and threshold, so that a margin of 1e-5
    shows as well as one of 0.5 (an axis from 0 would flatten both an error of 1e-5 and an agreement of 0.9999)."""
    with matplotlib.rc_context(SVG_SETTINGS):
        figure = _figure(8, 0.7 * len(report_checks) + 0.3)
        rows = figure.subplots(len(report_checks), 1, squeeze=False)[:, 0]
        for row, check in zip(rows, report_checks):
            value, threshold = check["value"], check["threshold"]
            pad = max(0.3 * abs(value - threshold), 0.01 * max(abs(value), abs(threshold)), 1e-12)
            low, high = min(value, threshold) - pad, max(value, threshold) + pad
            failing = (low, threshold) if check["higher_is_better"] else (threshold, high)
            passing = (threshold, high) if check["higher_is_better"] else (low, threshold)
            row.axvspan(*passing, color=PASSED_COLOR, alpha=0.12, linewidth=0)
            row.axvspan(*failing, color=FAILED_COLOR, alpha=0.12, linewidth=0)
            row.axvline(threshold, color="black", linestyle="--", linewidth=1.2)
            row.plot([value], [0], "o", markersize=9, color=PASSED_COLOR if check["passed"] else FAILED_COLOR)
            row.set_xlim(low, high)
            row.set_yticks([])
            bound = ">=" if check["higher_is_better"] else "<="
            row.set_title(f"{check['name']}: {value:.4g} (must be {bound} {threshold:.4g})", loc="left",
                          fontsize=8)
        return svg_text(figure)


def perplexities(rows: Sequence[dict[str, Any]], reference: float) -> str:
    """Each artifact's perplexity as a point labelled with its change from the reference's (dashed line)."""
    with matplotlib.rc_context(SVG_SETTINGS):
        figure = _figure(max(4.0, 1.3 * len(rows) + 1.5), 3)
        axes = figure.subplots()
        positions = range(len(rows))
        values = [row["perplexity"] for row in rows]
        axes.scatter(positions, values, s=60, color="#1565c0", zorder=3)
        for position, row in zip(positions, rows):
            axes.annotate(f"{row['perplexity']:.3f} ({row['perplexity_change']:+.2%})", (position, row["perplexity"]),
                          textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
        axes.axhline(reference, color="black", linestyle="--", linewidth=1, label=f"reference {reference:.3f}")
        spread = max(values + [reference]) - min(values + [reference]) or reference * 0.01
        axes.set_ylim(min(values + [reference]) - 0.3 * spread, max(values + [reference]) + 0.5 * spread)
        axes.set_xticks(list(positions), [row["artifact"] for row in rows])
        axes.set_xlim(-0.6, len(rows) - 0.4)
        axes.set_ylabel("perplexity")
        axes.set_title("perplexity per artifact")
        axes.grid(axis="y", alpha=0.3)
        axes.legend(fontsize=8, loc="lower right")
        return svg_text(figure)


def agreement_matrix(labels: Sequence[str], agreement: Sequence[Sequence[float]]) -> str:
    """A heatmap of top-1 agreement between every two models (``agreement[i][j]``), each cell numbered."""
    with matplotlib.rc_context(SVG_SETTINGS):
        size = 1.0 + 0.9 * len(labels)
        figure = _figure(size + 1.2, size)
        axes = figure.subplots()
        lowest = min(min(row) for row in agreement)
        image = axes.imshow(agreement, cmap="viridis", vmin=min(lowest, 0.999), vmax=1.0)
        for i, row in enumerate(agreement):
            for j, value in enumerate(row):
                shade = (value - image.norm.vmin) / (image.norm.vmax - image.norm.vmin)
                axes.text(j, i, f"{value:.1%}", ha="center", va="center", fontsize=8,
                          color="black" if shade > 0.6 else "white")
        axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        axes.set_yticks(range(len(labels)), labels)
        axes.set_title("top-1 agreement")
        figure.colorbar(image, ax=axes, shrink=0.8)
        return svg_text(figure)


def layer_values(values: dict[str, float], label: str, title: str) -> str:
    """One horizontal bar per layer (``values``: layer name -> figure), in the manifest's order."""
    with matplotlib.rc_context(SVG_SETTINGS):
        figure = _figure(7, 0.22 * len(values) + 1.0)
        axes = figure.subplots()
        names = [short_layer_name(name) for name in values]
        axes.barh(range(len(values)), list(values.values()), color="#6a1b9a")
        axes.set_yticks(range(len(values)), names, fontsize=7)
        axes.invert_yaxis()
        axes.set_xlabel(label)
        axes.set_title(title)
        axes.grid(axis="x", alpha=0.3)
        return svg_text(figure)


def short_layer_name(name: str) -> str:
    """``model.layers.1.mlp.down_proj.weight.T`` -> ``layers.1.mlp.down_proj``: what tells layers apart."""
    return re.sub(r"\.weight(\.T)?$", "", re.sub(r"^model\.", "", name))
