"""Validation reports: ``report.json`` for machines, ``report.html`` for people, a table for the terminal."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from rich.table import Table

from nanoexport.artifact import write_json


def format_value(value: float) -> str:
    return f"{value:.3e}" if value and abs(value) < 1e-2 else f"{value:.4f}"


def report_table(report: dict[str, Any]) -> Table:
    status = "[green]PASS[/]" if report["passed"] else "[red]FAIL[/]"
    table = Table(title=f"validation of {report['artifact']} ({report['target']}): {status}")
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
    write_json(folder / "report.json", report)
    rows = "".join(
        "<tr class='{}'><td>{}</td><td>{}</td><td>{} {}</td><td>{}</td><td>{}</td></tr>".format(
            "pass" if c["passed"] else "fail",
            html.escape(c["name"]),
            format_value(c["value"]),
            "&ge;" if c["higher_is_better"] else "&le;",
            format_value(c["threshold"]),
            "pass" if c["passed"] else "FAIL",
            html.escape(c["detail"]),
        )
        for c in report["checks"]
    ) + "".join(
        f"<tr><td>{html.escape(name)}</td><td>{format_value(value)}</td><td></td><td></td><td>measured</td></tr>"
        for name, value in report.get("measured", {}).items()
    )
    verdict = "passed" if report["passed"] else "FAILED"
    (folder / "report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>nanoexport validation</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
        ".fail{background:#fdd}.pass{background:#efe}</style>"
        f"<h1>{html.escape(report['model'])} &rarr; {html.escape(report['target'])}: {verdict}</h1>"
        f"<p>{report['prompts']} prompts</p><table><tr><th>check</th><th>value</th><th>threshold</th>"
        f"<th>result</th><th>detail</th></tr>{rows}</table>"
        + "".join(f"<p>{html.escape(note)}</p>" for note in report.get("notes", [])) + "\n",
        encoding="utf-8",
    )


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
                          _integers(row), f"{row['seconds']['total']:.1f}")
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
                      _percent(pair["greedy_agreement"], signed=False), _yes_no(pair["canonical_digests_equal"]),
                      _yes_no(pair["stored_digests_equal"]), pair["gate"],
                      "[green]pass[/]" if pair["passed"] else "[red]fail[/]")
    if report["failures"]:
        pairs.caption = "\n".join(report["failures"])
    return [artifacts, pairs]


def _shown(value: float | None) -> str:
    return "-" if value is None else format_value(value)


def _percent(value: float | None, signed: bool = True) -> str:
    return "-" if value is None else f"{value:+.3%}" if signed else f"{value:.1%}"


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "[red]no[/]"


def _integers(row: dict[str, Any]) -> str:
    """The artifact's stored integers: as canonical, changed by the target by design, or changed since its build."""
    if row["weights_intact"] is False:
        return "[red]changed since build[/]"
    if row["stored_equals_canonical"] is None:
        return "-"
    return "canonical" if row["stored_equals_canonical"] else "re-rounded by target"
