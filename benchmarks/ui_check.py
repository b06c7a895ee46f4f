"""Walks README's "Compare a sweep" click by click in a real browser (headless Chromium, Debian's
`chromium` package) against the MLflow version installed here, and screenshots every step.

A 3-job width sweep with the fixed overrides a user types goes into a temporary store; `cifar-exp
ui` serves it on a free 127.0.0.1 port; Chromium is driven through its DevTools protocol (aiohttp's
websocket client, no other dependency), with real mouse events. Nothing leaves 127.0.0.1.
Prints what each step showed (URL, the text that matters) and where its screenshot is; exits
non-zero if a step did not find what the README promises.

Also checked (issue 22 items 1, 4, 7): a child's sample and prediction grids (screenshots to look at:
every class should be there); a child resumed further after the sweep (`resume CHILD
trainer.epochs=4`) refreshes the parent's best, description and summary, which marks the epochs
that differ; `cifar-exp ui` says ready only once /health answers, and Ctrl-C stops its whole
process group.

usage: python benchmarks/ui_check.py [--out DIR]     (apt-get install chromium)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# A width sweep as a user types it: fixed overrides first, the swept key last.
SWEEP = [
    "dataset=synthetic",
    "dataset.train_size=1000",
    "dataset.test_size=500",
    "dataset.noise=0.35",
    "trainer.epochs=2",
    "trainer.batch_size=16",
    "device=cpu",
    "model.conv1_out=4,8,16",
    "-m",
]
WIDTHS = ["4", "8", "16"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """Headless Chromium on a fresh profile (a first-time user), driven over the DevTools protocol."""

    def __init__(self, profile: Path, size: tuple[int, int] = (1600, 1000)) -> None:
        port = free_port()
        self.proc = subprocess.Popen(
            [
                shutil.which("chromium") or "chromium",
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                f"--remote-debugging-port={port}",
                f"--window-size={size[0]},{size[1]}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.loop = asyncio.new_event_loop()
        deadline = time.monotonic() + 30
        while True:
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        page = next(t for t in targets if t["type"] == "page")
        self.id = 0
        self.loop.run_until_complete(self._connect(page["webSocketDebuggerUrl"]))
        self.call("Page.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=size[0],
            height=size[1],
            deviceScaleFactor=1,
            mobile=False,
        )

    async def _connect(self, url: str) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(url, max_msg_size=0)

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.id += 1
        await self.ws.send_str(json.dumps({"id": self.id, "method": method, "params": params}))
        while True:
            message = json.loads((await self.ws.receive()).data)
            if message.get("id") == self.id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.loop.run_until_complete(self._call(method, params))

    def go(self, url: str, until: str | None = None, timeout: float = 30) -> None:
        """Opens `url` and waits until the page shows `until` (or a few seconds)."""
        self.call("Page.navigate", url=url)
        self.wait_for(until, timeout) if until else time.sleep(5)

    def wait_for(self, text: str, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in (self.js("document.body ? document.body.innerText : ''") or ""):
                time.sleep(1)  # let the rest of the page settle
                return True
            time.sleep(0.5)
        return False

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"].get("text"))
        return result["result"].get("value")

    def text(self) -> str:
        return self.js("document.body.innerText") or ""

    def shot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def _centre(self, finder: str) -> list[float] | None:
        """Scrolls the element `finder` (a JS expression) into view; its centre, or None."""
        return self.js(
            f"""(() => {{ const e = {finder}; if (!e) return null;
            e.scrollIntoView({{block: 'center', inline: 'center'}});
            const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"""
        )

    def click_at(self, finder: str, wait: float = 1.5) -> bool:
        """A real mouse click (move, press, release) on the element `finder` finds."""
        at = self._centre(finder)
        if at is None:
            return False
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=at[0], y=at[1], button="left", clickCount=1)
        time.sleep(wait)
        return True

    def click_text(self, text: str, css: str = "*", nth: int = 0, wait: float = 1.5) -> bool:
        """Clicks the innermost visible element (matching `css`) whose text is `text`."""
        finder = f"""(() => {{ const els = [...document.querySelectorAll({json.dumps(css)})].filter(e => {{
            const r = e.getBoundingClientRect();
            return (e.innerText || '').trim() === {json.dumps(text)} && r.width > 0 && r.height > 0; }});
            return els.filter(e => !els.some(o => o !== e && e.contains(o)))[{nth}]; }})()"""
        return self.click_at(finder, wait)

    def click_css(self, css: str, nth: int = 0, wait: float = 1.5) -> bool:
        return self.click_at(f"document.querySelectorAll({json.dumps(css)})[{nth}]", wait)

    def type(self, text: str) -> None:
        for char in text:
            self.call("Input.dispatchKeyEvent", type="char", text=char)
        time.sleep(1)

    def escape(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent", type=kind, key="Escape", code="Escape", windowsVirtualKeyCode=27
            )
        time.sleep(0.5)

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.proc.terminate()
        self.proc.wait(10)


class Walk:
    """The steps, each a screenshot and a line of what it showed; failures are counted."""

    def __init__(self, browser: Browser, out: Path) -> None:
        self.browser, self.out, self.failed, self.n = browser, out, 0, 0

    def step(self, name: str, saw: str, ok: bool = True) -> None:
        self.n += 1
        path = self.out / f"{self.n:02d}_{name}.png"
        self.browser.shot(path)
        self.failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {path.name}: {saw}", flush=True)


def choose(browser: Browser, select_index: int, option: str) -> bool:
    """Opens the `select_index`-th select of the page, types `option` and clicks that option."""
    if not browser.click_css(".du-bois-light-select-selector", select_index):
        return False
    browser.type(option)
    return browser.click_text(option, ".du-bois-light-select-item-option-content")


def walk(browser: Browser, links: dict[str, str], base: str, out: Path, after: dict[str, Any]) -> int:
    """The README's clicks; `after`: what the sweep looks like after a child was resumed further
    (its run id and experiment, the best by `cifar-exp compare`)."""
    w = Walk(browser, out)
    names = [f"conv1_out={width}" for width in WIDTHS]

    browser.go(base, until="cifar_exp")
    text = browser.text()
    w.step(
        "home",
        f"experiments listed: cifar_exp, Default {'shown' if 'Default' in text else 'hidden'}",
        "Default" not in text,
    )
    browser.click_text("cifar_exp", "a")
    browser.wait_for("cifar_exp")
    time.sleep(4)
    url = browser.js("location.href")
    view = "GenAI view" if "workflowType=genai" in url else "model-training view"
    w.step("experiment_clicked", f"{url} ({view})")
    browser.click_text("Got it", "button")  # a first visit's "Detect Issues in Your Traces" tip
    browser.click_text("Model training", "button, [role=radio], label, span")
    browser.wait_for("Run Name")
    text = browser.text()
    parent = next((line for line in text.splitlines() if line.startswith("sweep ")), "")
    w.step("model_training_switch", f"{browser.js('location.href')}: runs table, {parent!r}", bool(parent))

    browser.go(links["runs:"], until="sweep ")
    text = browser.text()
    parent = next((line for line in text.splitlines() if line.startswith("sweep ")), "")
    w.step("runs_link", f"model-training view, parent run {parent!r}", "Run Name" in text and bool(parent))
    browser.click_css('button[data-component-id="mlflow.assistant.chat_panel.close"]', wait=1)

    browser.click_css('button[data-component-id$="runnamecellrenderer.tsx_46"]')  # the parent's "+"
    text = browser.text()
    w.step("parent_expanded", f"children: {[n for n in names if n in text]}", all(n in text for n in names))

    ticked = 0
    for name in names:  # the checkbox in the row of the child named `name`
        link = (
            f"[...document.querySelectorAll('.ag-row a')].find(a => a.innerText.trim() == {json.dumps(name)})"
        )
        row_id = browser.js(
            f"(() => {{ const a = {link}; return a && a.closest('.ag-row').getAttribute('row-id'); }})()"
        )
        ticked += browser.click_css(f'.ag-row[row-id="{row_id}"] input.ag-checkbox-input', wait=0.5)
    w.step(
        "children_ticked",
        f"{ticked} ticked; Compare button {'shown' if 'Compare' in browser.text() else 'missing'}",
        ticked == 3 and "Compare" in browser.text(),
    )

    browser.click_text("Compare", "button")
    browser.wait_for("Parallel Coordinates Plot")
    text = browser.text()
    metric = re.search(r"Metrics:\n(.+)", text)
    params = re.search(r"Parameters:\n(.+)", text)
    heading = re.search(r"Comparing \d+ Runs?", text)
    w.step(
        "compare_parallel_default",
        f"{heading and heading[0]}; Parameters: {params and params[1]}, Metrics: {metric and metric[1]}",
        "Comparing 3 Runs" in text,
    )
    browser.click_css(".du-bois-light-select-selection-item-remove", 1)  # the metric's x
    chosen = choose(browser, 1, "val/acc")  # what chooses
    browser.escape()  # closes the dropdown
    metric = re.search(r"Metrics:\n(.+)", browser.text())
    w.step(
        "compare_parallel_val_acc",
        f"Metrics now: {metric and metric[1]}",
        chosen and bool(metric) and metric[1] == "val/acc",
    )

    browser.click_text("Scatter Plot", "[role=tab]")
    text = browser.text()
    x = re.search(r"X-axis:\n(.+)", text)
    y = re.search(r"Y-axis:\n(.+)", text)
    w.step("compare_scatter_default", f"X-axis: {x and x[1]}, Y-axis: {y and y[1]}")
    browser.click_css("#x-axis-selector")
    chosen = browser.click_text("model.conv1_out", "[role=option]")
    x = re.search(r"X-axis:\n(.+)", browser.text())
    w.step(
        "compare_scatter_width", f"X-axis now: {x and x[1]}", chosen and bool(x) and x[1] == "model.conv1_out"
    )

    switches = "[...document.querySelectorAll('[role=switch]')]"
    switch = f"{switches}.find(e => e.parentElement.innerText.includes('Show diff only'))"
    browser.click_at(switch)  # Parameters' "Show diff only"
    text = browser.text()
    section = text[text.find("Show diff only") : text.find("Metrics", text.find("Show diff only"))]
    shown = sorted(set(re.findall(r"^([a-z_]+\.[\w.]+)\t", section, re.MULTILINE)))
    w.step("compare_params_diff_only", f"parameters left: {shown}", shown == ["model.conv1_out"])

    browser.go(links["its runs compared:"], until="Parallel Coordinates Plot")
    heading = re.search(r"Comparing \d+ Runs?", browser.text())
    w.step("compare_link", f"{heading and heading[0]}", bool(heading) and heading[0] == "Comparing 3 Runs")

    browser.go(links["its runs, best first:"], until="conv1_out=")
    text = browser.text()
    order = sorted(names, key=lambda n: text.find(n + "\n"))
    w.step("best_first_link", f"rows in order: {order}", all(n in text for n in names))

    browser.go(links["runs:"], until="sweep ")
    browser.click_css('button[data-component-id="mlflow.experiment_page.sort_select_v2.toggle"]')
    browser.click_text("val/acc", "[data-testid^=sort-select], [role=menuitemcheckbox]")
    browser.escape()
    browser.click_text("Columns", "button")
    browser.type("conv1_out")
    browser.click_text("model.conv1_out", "span, div, label")
    browser.escape()
    headers = browser.js("[...document.querySelectorAll('.ag-header-cell')].map(c => c.innerText.trim())")
    rows = [line for line in browser.text().splitlines() if line in names or line.startswith("sweep ")]
    w.step(
        "runs_sorted_with_columns",
        f"Sort: val/acc, Columns: conv1_out -> columns {[h for h in headers if h]}, rows {rows}",
        "val/acc" in headers and "model.conv1_out" in headers,
    )

    browser.go(links["latest sweep:"], until="Description")
    text = browser.text()
    best = re.search(r"Best: (.+)", text)
    count = re.search(r"Parameters \((\d+)\)", text)
    w.step(
        "parent_run",
        f"description: {best and best[0]!r}; Parameters ({count and count[1]})",
        bool(best) and bool(count) and int(count[1]) > 0,
    )
    browser.click_text("Artifacts", "[role=tab], button, a, span")
    browser.click_text("sweep", wait=2)
    browser.click_text("accuracy.png", wait=3)
    size = browser.js(
        "(() => { const i = [...document.images].sort((a, b) => b.naturalWidth - a.naturalWidth)[0];"
        " return i && [i.naturalWidth, i.naturalHeight, Math.round(i.getBoundingClientRect().width)]; })()"
    )
    w.step(
        "parent_plot",
        f"sweep/accuracy.png: natural {size and size[:2]} px, shown {size and size[2]} px wide",
        bool(size),
    )
    browser.click_text("summary.md", wait=3)
    text = browser.text()
    w.step("parent_summary", "sweep/summary.md previewed", "test/acc" in text)
    # item 4: the resumed child trained 4 epochs, the others 2: the refreshed summary says so
    marked = re.search(r"[^\n]*different[^\n]*epochs[^\n]*|[^\n]*epochs[^\n]*differ[^\n]*", text)
    w.step(
        "parent_refreshed",
        f"best in the description {best and best[1].split(',')[0]!r}, by compare {after['best']!r}; "
        f"epochs line: {marked and marked[0].strip()!r}",
        bool(best) and best[1].split(",")[0] == after["best"] and bool(marked),
    )
    for figure in ("train_samples.png", "test_predictions.png"):  # item 1: every class in the grids
        page = f"{base}/#/experiments/{after['experiment']}/runs/{after['child']}/artifacts"
        browser.go(page, until="figures")
        if figure not in browser.text():  # the folder may still be open from the last figure
            browser.click_text("figures", wait=2)
        shown = browser.click_text(figure, wait=3)
        w.step(f"child_{figure[:-4]}", f"{after['child'][:8]}: figures/{figure} (look at it)", shown)
    return w.failed


def resume_a_child(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Resumes the sweep's weakest child to 4 epochs, as a user would after the sweep; returns its
    run id, its experiment, and the best config `cifar-exp compare` names afterwards."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cifar_exp").experiment_id
    children = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" in r.data.tags]
    weakest = min(children, key=lambda r: r.data.metrics.get("val/acc", 0.0))
    resumed = subprocess.run(
        [sys.executable, "-m", "cifar_exp", "resume", weakest.info.run_id, "trainer.epochs=4"],
        cwd=cwd, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if resumed.returncode:
        raise RuntimeError(f"resume failed: {resumed.stderr[-2000:]}")
    print(f"resumed {weakest.data.tags.get('mlflow.runName')} to 4 epochs; compare now says:")
    compare = subprocess.run(
        [sys.executable, "-m", "cifar_exp", "compare"], cwd=cwd, env=env, capture_output=True, text=True
    )
    print(compare.stdout)
    star = next(line for line in compare.stdout.splitlines() if line.startswith("*"))
    return {"child": weakest.info.run_id, "experiment": experiment, "best": f"conv1_out={star.split()[1]}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="screenshots folder (default: a temp folder)")
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        print("needs Chromium: apt-get install chromium", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="cifar_exp-ui-check-"))
    out = args.out or root / "screens"
    out.mkdir(parents=True, exist_ok=True)
    cwd = root / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_", "CIFAR_EXP_"))}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'store' / 'mlflow.db'}",
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    started = time.monotonic()
    sweep = subprocess.run(
        [sys.executable, "-m", "cifar_exp", *SWEEP], cwd=cwd, env=env, capture_output=True, text=True
    )
    if sweep.returncode:
        print(sweep.stdout + sweep.stderr, file=sys.stderr)
        return 1
    print(f"sweep: {time.monotonic() - started:.0f} s; its table, from `cifar-exp compare`:")
    subprocess.run([sys.executable, "-m", "cifar_exp", "compare"], cwd=cwd, env=env)
    after = resume_a_child(env, cwd)

    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "cifar_exp", "ui", "--port", str(port)],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,  # its own process group, to see that Ctrl-C leaves nothing of it
    )  # fmt: skip
    asked = time.monotonic()
    browser = None
    failed_ready = False
    try:
        links: dict[str, str] = {}
        print("`cifar-exp ui` printed:")
        for line in ui.stdout:
            print("  " + line.rstrip())
            if "ready" in line:  # item 7: said only once the server answers
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    print(f"  (ready after {time.monotonic() - asked:.1f} s; /health answers: ok)")
                except OSError:
                    print("  FAIL: said ready, but /health does not answer")
                    failed_ready = True
            if match := re.match(r"\s+(\S.*?:)\s+(http\S+)$", line):
                links[match[1]] = match[2]
            if "its runs compared:" in links:
                break
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or ui.poll() is not None:
                    raise RuntimeError("the MLflow UI did not start") from None
                time.sleep(0.5)
        browser = Browser(root / "profile")
        failed = walk(browser, links, base, out, after)
    finally:
        if browser is not None:
            browser.close()
        ui.send_signal(signal.SIGINT)  # Ctrl-C
        ui.wait(20)
    time.sleep(1)
    try:
        os.killpg(ui.pid, 0)
        left = subprocess.run(["pgrep", "-g", str(ui.pid)], capture_output=True, text=True).stdout.split()
    except ProcessLookupError:
        left = []
    print(f"Ctrl-C on `cifar-exp ui`: exit {ui.returncode}, {len(left)} processes of it left {left}")
    strays = [p.name for p in cwd.iterdir() if p.name in ("mlruns", "mlartifacts")]
    print(f"working folder: {'stray ' + str(strays) if strays else 'no mlruns/ or mlartifacts/ created'}")
    print(f"screenshots: {out}")
    for name in ("cwd", "store", "profile"):
        shutil.rmtree(root / name, ignore_errors=True)
    return 1 if failed or strays or left or failed_ready else 0


if __name__ == "__main__":
    sys.exit(main())
