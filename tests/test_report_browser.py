"""The report as a browser shows it: headless Debian chromium renders the page, its DOM
holds the summary table and the plots, nothing is logged to the console, and a
screenshot is saved (copied to $CUNET_REPORT_SCREENSHOT when set, for a person to look at)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cunet_optimize.report import write_report

from test_report import full_profile

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="needs Debian chromium (/usr/bin/chromium); CI installs it"
)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_S = 180


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile_dir = tmp / "chromium-profile"
    return subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile_dir}", *args],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    _, html = write_report(full_profile(extra_variants=3), tmp / "reports", "browser-test")
    return html


def test_dom_has_summary_table_and_plots_and_no_console_errors(report, tmp_path):
    proc = chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", report.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert re.search(r'<section id="summary">.*?<table class="summary">', dom, re.S)
    assert dom.count("<svg") >= 3
    assert "cunet-int8-cpu" in dom and "bundle only" in dom
    console = [line for line in proc.stderr.splitlines() if "Uncaught" in line or "ERROR:CONSOLE" in line]
    assert console == []


def test_screenshot(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    proc = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,2400", report.as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1400, 2400)
        colours = im.convert("RGB").resize((140, 240)).getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 50  # text, tables and plots, not a blank page
    target = os.environ.get("CUNET_REPORT_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
