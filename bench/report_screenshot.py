"""Render a profile-routing report.html in headless Chromium and save screenshots (for docs/img).

    python bench/report_screenshot.py                       # profile examples/tiny-moe, then render
    python bench/report_screenshot.py --report routing/     # render an existing --out folder

The report is opened as a user would open it: a real browser, the file from disk, no network. The
page is captured at a desktop width and at a phone width, and the routing plots are copied beside
the screenshots. Needs Chromium (Debian: ``apt-get install -y chromium``).

Prints the files written and the time each step took.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Running `python bench/X.py` puts bench/ first on sys.path, where bench/inspect.py would shadow the
# standard library's inspect (which matplotlib imports).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

# Flags for a browser with nothing to talk to: no sandbox (containers), no GPU, no network services.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found: apt-get install -y chromium")


def screenshot(browser: str, page: Path, out: Path, *, width: int, height: int) -> float:
    """Capture ``page`` at ``width`` x ``height`` CSS pixels into ``out``; return the seconds it took."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moetool-chromium-") as profile:
        command = [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={out}",
            page.resolve().as_uri(),
        ]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    _trim_bottom(out)
    return time.perf_counter() - started


def _trim_bottom(path: Path, margin: int = 24) -> None:
    """Cut the blank rows below the page's content (the window is taller than the page)."""
    import matplotlib.image as mpimg
    import numpy as np

    image = mpimg.imread(path)
    rgb = image[..., :3]
    blank = np.all(np.abs(rgb - rgb[-1:, :, :]) < 1e-3, axis=(1, 2))
    content = np.nonzero(~blank)[0]
    if content.size:
        mpimg.imsave(path, image[: min(len(image), content[-1] + 1 + margin)])


def profile(folder: Path) -> float:
    """Run the README's profile-routing command on the example model into ``folder``."""
    started = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "moetool",
        "profile-routing",
        "examples/tiny-moe",
        "-d",
        "examples/data/heldout.jsonl",
        "--domain-field",
        "domain",
        "--max-tokens",
        "0",
        "--out",
        str(folder),
        "--overwrite",
    ]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, help="an existing profile-routing --out folder")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where to write the PNGs")
    parser.add_argument("--height", type=int, default=3400, help="page height captured at desktop width")
    args = parser.parse_args()

    browser = find_chromium()
    version = subprocess.run([browser, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"browser: {version}")
    with tempfile.TemporaryDirectory(prefix="moetool-report-") as tmp:
        folder = args.report
        if folder is None:
            folder = Path(tmp) / "routing"
            print(f"profile-routing examples/tiny-moe: {profile(folder):.1f} s")
        page = folder / "report.html"
        args.out.mkdir(parents=True, exist_ok=True)
        desktop = args.out / "report.png"
        phone = args.out / "report-narrow.png"
        print(f"{desktop}: {screenshot(browser, page, desktop, width=1200, height=args.height):.1f} s")
        print(f"{phone}: {screenshot(browser, page, phone, width=420, height=1400):.1f} s")
        for name in ("load_heatmap.png", "coactivation.png", "domain_load.png"):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, args.out / name)
                print(f"{args.out / name}: copied from the report folder")


if __name__ == "__main__":
    main()
