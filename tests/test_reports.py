"""``report.html``: one self-contained page per validation and per comparison, its plots drawn by matplotlib
as inline SVG (the figures they draw are in ``report.json`` too), and the page as a browser renders it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from report_pages import NO_BROWSER, assert_self_contained, find_browser, plots_of, rendered_plots

from nanoexport.validate import validate
from nanoexport.validate.report import html_twin


@pytest.fixture(scope="module")
def validated(demo_artifact) -> Path:
    validate(demo_artifact)
    return demo_artifact.path


def test_validation_page_plots_what_report_json_holds(validated):
    report = json.loads((validated / "report.json").read_text())
    page = (validated / "report.html").read_text()
    # The error per position of every prompt, as the plot's data: one value per prompt token.
    assert len(report["logits_error_by_position"]) == len(report["kv_error_by_position"]) == report["prompts"]
    for logits, kv in zip(report["logits_error_by_position"], report["kv_error_by_position"]):
        assert len(logits["max_abs"]) == len(logits["one_minus_cosine"]) == len(kv["max_abs"]) > kv["prefill"]
        assert 0 < max(logits["max_abs"]) <= report["checks"][0]["value"]
    plots = plots_of(page)
    assert len(plots) == 2, page[:2000]  # the checks against their thresholds; the error per position
    checks, positions = plots
    for check in report["checks"]:
        assert check["name"] in checks
    assert "token position" in positions and positions.count("<path") > 20
    assert_self_contained(page)


def test_compare_report_html_beside_the_json_never_over_it():
    assert html_twin(Path("out/report.json")) == Path("out/report.html")
    assert html_twin(Path("parity")) == Path("parity.html")
    assert html_twin(Path("parity.html")) == Path("parity.html.html")


def test_the_command_line_starts_without_matplotlib():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, nanoexport.cli, nanoexport.validate.compare; "
                               "print('matplotlib' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )
    assert loaded.stdout.strip() == "False"


@pytest.mark.skipif(find_browser() is None, reason=NO_BROWSER)
def test_validation_page_renders_its_plots_in_a_browser(validated, tmp_path):
    plots = rendered_plots(validated / "report.html", tmp_path)
    assert len(plots) == 2
    for plot in plots:
        assert plot["width"] > 300 and plot["height"] > 100, plot
        assert plot["shapes"] > 20 and plot["texts"] > 10, plot
