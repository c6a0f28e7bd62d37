"""Read the plots of a ``report.html`` page, check it needs nothing from elsewhere, and render it in headless
Chromium to measure what a reader's browser draws."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
NO_BROWSER = "no chromium or chrome on PATH to render the report in (.ci/run installs chromium where apt-get can)"
# Appended to a copy of the page (the report itself has no script): after layout, the size of each plot's
# <svg> and how many of its shapes and texts the browser drew with a non-empty box, written into the DOM.
MEASURE = """<script>
addEventListener("load", () => {
  const plots = [...document.querySelectorAll("figure.plot svg")].map(svg => {
    const box = svg.getBoundingClientRect();
    const drawn = selector => [...svg.querySelectorAll(selector)].filter(element => {
      const shape = element.getBBox();
      return shape.width > 0 || shape.height > 0;
    }).length;
    return {width: box.width, height: box.height, shapes: drawn("path, use"), texts: drawn("text")};
  });
  const out = document.createElement("pre");
  out.id = "measured";
  out.textContent = JSON.stringify(plots);
  document.body.append(out);
});
</script>"""


def plots_of(page: str) -> list[str]:
    """The inline SVG of each plot on ``page``, in order."""
    return re.findall(r"<figure class='plot'>(<svg.*?</svg>)\s*<figcaption>", page, re.DOTALL)


def assert_self_contained(page: str) -> None:
    """Nothing on ``page`` is fetched from elsewhere: no URL, no script, no external source or style."""
    assert "http" not in page and "file:" not in page
    assert not re.search(r"<script|<link|<img|<iframe|@import|\bsrc=|url\((?!#)", page)


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def rendered_plots(page: Path, scratch: Path) -> list[dict]:
    """Each plot of ``page`` as the browser laid it out: {"width", "height" (CSS pixels), "shapes", "texts"}."""
    measured_page = scratch / "measured.html"
    measured_page.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"),
                             encoding="utf-8")
    result = subprocess.run(
        [find_browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={scratch / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", measured_page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    found = re.search(r'<pre id="measured">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, f"the browser did not run the measuring script: {result.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))
