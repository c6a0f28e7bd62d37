"""Validation reports: ``report.json`` for machines, ``report.html`` for people, a table for the terminal."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

from rich.table import Table

from nanoexport.artifact import write_json

log = logging.getLogger(__name__)
STYLE = ("body{font-family:sans-serif;margin:1.5em;color:#222}td,th{padding:4px 10px;border-bottom:1px solid #ddd;"
         "text-align:left}.fail{background:#fdd}.pass{background:#efe}figure.plot{margin:1.5em 0}"
         "figure.plot svg{max-width:100%;height:auto}figcaption{color:#555;font-size:0.9em}")


def format_value(value: float) -> str:
    return f"{value:.3e}" if value and abs(value) < 1e-2 else f"{value:.4f}"


def report_table(report: dict[str, Any]) -> Table:
    status = "[green]PASS[/]" if report["passed"] else "[red]FAIL[/]"
    table = Table(title=f"validation of {report['artifact']} ({report['target']}) against "
                        f"{report.get('reference') or 'the reference'}: {status}")
    for column in ("check", "value", "threshold", "result", "detail"):
        table.add_column(column)
    for check in report["checks"]:
        bound = (">= " if check["higher_is_better"] else "<= ") + format_value(check["threshold"])
        result = "[green]pass[/]" if check["passed"] else "[red]fail[/]"
        table.add_row(check["name"], format_value(check["value"]), bound, result, check["detail"])
    for name, value in report.get("measured", {}).items():
        table.add_row(name, format_value(value), "", "", "measured, not gated")
    if report.get("notes"):
        table.caption = "\n".join(report["notes"])
    return table


def write_report(folder: Path, report: dict[str, Any]) -> None:
    """Write validation's ``report`` (``ValidationReport.to_dict()``) into ``folder`` as ``report.json`` and as
    ``report.html``, one self-contained page of the same figures in tables and plots."""
    write_json(folder / "report.json", report)
    (folder / "report.html").write_text(validation_html(report), encoding="utf-8")


def validation_html(report: dict[str, Any]) -> str:
    """Validation's ``report`` as a page: the checks against their thresholds and the error per token position
    plotted, then the table of checks and measured figures, and the target's notes."""
    from nanoexport.validate import plots  # matplotlib, only once there is a report to draw

    figures = []
    if report["checks"]:
        figures.append(_figure("checks against their thresholds", plots.checks(report["checks"])))
    if report.get("logits_error_by_position"):
        figures.append(_figure("error per token position, one line per prompt", plots.position_errors(
            report["logits_error_by_position"], report.get("kv_error_by_position", []))))
    rows = [
        ("pass" if check["passed"] else "fail",
         [check["name"], format_value(check["value"]),
          (">= " if check["higher_is_better"] else "<= ") + format_value(check["threshold"]),
          "pass" if check["passed"] else "FAIL", check["detail"]])
        for check in report["checks"]
    ] + [("", [name, format_value(value), "", "", "measured, not gated"])
         for name, value in report.get("measured", {}).items()]
    verdict = "passed" if report["passed"] else "FAILED"
    return _page(
        f"validation of {report['artifact']}",
        f"{html.escape(report['model'])} &rarr; {html.escape(report['target'])}: {verdict}",
        [f"<p>{report['prompts']} prompts; artifact {html.escape(report['artifact'])}; reference "
         f"{html.escape(report.get('reference') or '-')}</p>", *figures,
         _table(("check", "value", "threshold", "result", "detail"), rows),
         *(f"<p>{html.escape(note)}</p>" for note in report.get("notes", []))],
    )


def write_compare_report(path: Path, report: dict[str, Any]) -> None:
    """Write ``nanoexport compare``'s ``report`` to ``path`` as JSON and beside it as HTML (``html_twin``)."""
    write_json(path, report)
    html_path = html_twin(path)
    html_path.write_text(compare_html(report), encoding="utf-8")
    log.info("compare report: %s and %s", path, html_path)


def html_twin(path: Path) -> Path:
    """Where the HTML beside the JSON report ``path`` goes: its name with ``.html`` for the suffix (appended to
    a name that already ends in ``.html``, so the JSON is never overwritten)."""
    return path.with_name(path.name + ".html") if path.suffix == ".html" else path.with_suffix(".html")


def compare_html(report: dict[str, Any]) -> str:
    """``nanoexport compare``'s report as a page: perplexity per artifact, the top-1 agreement of every two
    models, and each layer's bits per weight and target re-rounding error where the manifests recorded them,
    plotted; then the tables of artifacts and pairs, and the failures."""
    from nanoexport.validate import plots  # matplotlib, only once there is a report to draw

    rows, reference = report["artifacts"], report["reference"]["perplexity"]
    figures = []
    if reference is not None and all(row["perplexity"] is not None for row in rows):
        figures.append(_figure("perplexity per artifact; dashed: the reference's",
                               plots.perplexities(rows, reference)))
    labels, matrix = agreement_matrix(report)
    figures.append(_figure("top-1 agreement of every two models, over every prompt position",
                           plots.agreement_matrix(labels, matrix)))
    for field, label, what in (("layer_bits", "bits per weight", "bits per weight of each layer"),
                               ("layer_weight_error", "relative RMS error",
                                "the target's re-rounding of each layer: error against the canonical weights")):
        for artifacts, values in _shared(rows, field):
            title = f"{what} ({', '.join(artifacts)})"
            figures.append(_figure(title, plots.layer_values(values, label, title)))
    artifact_rows = [
        ("fail" if row["weights_intact"] is False else "",
         [row["artifact"], _shown(row["perplexity"]), _percent(row["perplexity_change"]),
          _percent(row["top1_agreement"], signed=False), _shown(row["logits_min_cosine"]),
          _percent(row["greedy_agreement"], signed=False), _shown(row["kv_max_abs"]),
          _integers(row), f"{row['seconds']['total']:.1f}"])
        for row in rows
    ]
    pair_rows = [
        ("pass" if pair["passed"] else "fail",
         [f"{pair['a']} / {pair['b']}", _percent(pair["perplexity_change"]),
          _percent(pair["top1_agreement"], signed=False), _shown(pair["logits_min_cosine"]),
          _percent(pair["greedy_agreement"], signed=False), _yes_no(pair["canonical_digests_equal"]),
          _yes_no(pair["stored_digests_equal"]), pair["gate"], "pass" if pair["passed"] else "FAIL"])
        for pair in report["pairs"]
    ]
    verdict = "passed" if report["passed"] else "FAILED"
    return _page(
        f"compare {report['model']}",
        f"compare {html.escape(report['model'])}: {verdict}",
        [f"<p>{html.escape(report['workload'])}; reference {html.escape(report['reference'].get('model', '-'))}, "
         f"perplexity {_shown(reference)}</p>", *figures,
         "<h2>artifacts</h2>",
         _table(("artifact", "perplexity", "change", "top-1", "min cosine", "greedy", "KV max-abs", "integers",
                 "seconds"), artifact_rows),
         "<h2>pairs</h2>",
         _table(("pair", "perplexity change", "top-1", "min cosine", "greedy", "same canonical integers",
                 "same stored integers", "gate", "result"), pair_rows),
         *(f"<p class='fail'>{html.escape(failure)}</p>" for failure in report["failures"])],
    )


def agreement_matrix(report: dict[str, Any]) -> tuple[list[str], list[list[float]]]:
    """The reference and every artifact of a compare ``report``, and the top-1 agreement of each two of them
    (1 on the diagonal), from its artifact rows (against the reference) and pairs."""
    labels = ["reference"] + [row["artifact"] for row in report["artifacts"]]
    agreement = {(label, label): 1.0 for label in labels}
    for row in report["artifacts"]:
        agreement["reference", row["artifact"]] = agreement[row["artifact"], "reference"] = row["top1_agreement"]
    for pair in report["pairs"]:
        agreement[pair["a"], pair["b"]] = agreement[pair["b"], pair["a"]] = pair["top1_agreement"]
    return labels, [[agreement[a, b] for b in labels] for a in labels]


def _shared(rows: list[dict[str, Any]], field: str) -> list[tuple[list[str], dict[str, float]]]:
    """The distinct values of ``field`` among ``rows`` (artifacts built from one quantization share their layer
    bits: one plot for them), each with the artifacts that have it; rows without it are left out."""
    groups: dict[str, tuple[list[str], dict[str, float]]] = {}
    for row in rows:
        if row.get(field):
            key = json.dumps(row[field], sort_keys=True)
            groups.setdefault(key, ([], row[field]))[0].append(row["artifact"])
    return list(groups.values())


def _page(title: str, heading: str, parts: list[str]) -> str:
    """A page that needs nothing beyond itself: styles inline, plots as inline SVG, no script."""
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>{heading}</h1>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def _figure(caption: str, svg: str) -> str:
    return f"<figure class='plot'>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _table(headers: tuple[str, ...], rows: list[tuple[str, list[str]]]) -> str:
    """An HTML table; ``rows``: (CSS class, cells), the cells escaped here."""
    head = "".join(f"<th>{html.escape(header)}</th>" for header in headers)
    body = "".join(f"<tr class='{row_class}'>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells)
                   + "</tr>" for row_class, cells in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def compare_tables(report: dict[str, Any]) -> list[Table]:
    """``nanoexport compare``'s report for the terminal: one row per artifact, one per pair."""
    status = "[green]PASS[/]" if report["passed"] else "[red]FAIL[/]"
    reference = report["reference"]["perplexity"]
    artifacts = Table(title=f"compare {report['model']}: {status} ({report['workload']}; reference perplexity "
                            f"{_shown(reference)})")
    for column in ("artifact", "perplexity", "change", "top-1", "min cosine", "greedy", "KV max-abs", "integers",
                   "seconds"):
        artifacts.add_column(column)
    for row in report["artifacts"]:
        artifacts.add_row(row["artifact"], _shown(row["perplexity"]), _percent(row["perplexity_change"]),
                          _percent(row["top1_agreement"], signed=False), _shown(row["logits_min_cosine"]),
                          _percent(row["greedy_agreement"], signed=False), _shown(row["kv_max_abs"]),
                          _red_when(_integers(row), row["weights_intact"] is False), f"{row['seconds']['total']:.1f}")
    scored_apart = [row for row in report["artifacts"] if row.get("scoring_runner_agreement")]
    artifacts.caption = "\n".join(
        f"{row['artifact']}: perplexity scored by the target's scoring runner, which agreed with its runner on "
        f"{row['scoring_runner_agreement']['top1_agreement']:.1%} of the prompts' top-1 tokens (logits max-abs "
        f"{format_value(row['scoring_runner_agreement']['logits_max_abs'])})" for row in scored_apart) or None
    pairs = Table(title="pairs")
    for column in ("pair", "perplexity change", "top-1", "min cosine", "greedy", "same canonical integers",
                   "same stored integers", "gate", "result"):
        pairs.add_column(column)
    for pair in report["pairs"]:
        pairs.add_row(f"{pair['a']} / {pair['b']}", _percent(pair["perplexity_change"]),
                      _percent(pair["top1_agreement"], signed=False), _shown(pair["logits_min_cosine"]),
                      _percent(pair["greedy_agreement"], signed=False),
                      _red_when(_yes_no(pair["canonical_digests_equal"]), pair["canonical_digests_equal"] is False),
                      _red_when(_yes_no(pair["stored_digests_equal"]), pair["stored_digests_equal"] is False),
                      pair["gate"],
                      "[green]pass[/]" if pair["passed"] else "[red]fail[/]")
    if report["failures"]:
        pairs.caption = "\n".join(report["failures"])
    return [artifacts, pairs]


def _shown(value: float | None) -> str:
    return "-" if value is None else format_value(value)


def _percent(value: float | None, signed: bool = True) -> str:
    return "-" if value is None else f"{value:+.3%}" if signed else f"{value:.1%}"


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def _red_when(text: str, condition: bool) -> str:
    """``text`` in red in the terminal's tables when ``condition`` holds."""
    return f"[red]{text}[/]" if condition else text


def _integers(row: dict[str, Any]) -> str:
    """The artifact's stored integers: as canonical, changed by the target by design, or changed since its build."""
    if row["weights_intact"] is False:
        return "changed since build"
    if row["stored_equals_canonical"] is None:
        return "-"
    return "canonical" if row["stored_equals_canonical"] else "re-rounded by target"
