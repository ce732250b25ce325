"""What optuna-dashboard shows of an ``optuna-ctpe search`` study: its API, and a real browser.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` packages and selenium; it is
skipped, with the reason, where they are missing. Set ``OPTUNA_CTPE_SCREENSHOT=docs/dashboard.png``
to have it save the screenshot committed in the repository.
"""

from __future__ import annotations

from collections.abc import Iterator
import io
import json
import os
from pathlib import Path
import shutil
import tempfile
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler
from wsgiref.simple_server import make_server
from wsgiref.util import setup_testing_defaults

import pytest


pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
optuna_dashboard = pytest.importorskip("optuna_dashboard")

import optuna  # noqa: E402

from optuna_ctpe.cli import main  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.slow]

STUDY = "digits-dashboard"
N_TRIALS = 8


@pytest.fixture(scope="module")
def storage_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A study made by the command line (in-process), with every attribute the dashboard shows."""
    folder = tmp_path_factory.mktemp("dashboard")
    url = f"sqlite:///{folder / 'dashboard.db'}"
    args = ["search", "--storage", url, "--study-name", STUDY, "--n-trials", str(N_TRIALS)]
    args += ["--cache-dir", str(folder / "cache"), "--no-progress"]
    assert main(args) == 0
    return url


def _get(app: Any, path: str) -> Any:
    """GET ``path`` from a WSGI app in-process and decode the JSON body."""
    environ: dict[str, Any] = {"PATH_INFO": path.split("?")[0], "QUERY_STRING": ""}
    if "?" in path:
        environ["QUERY_STRING"] = path.split("?", 1)[1]
    setup_testing_defaults(environ)
    environ["wsgi.input"] = io.BytesIO()
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), (status, body[:300])
    return json.loads(body)


def _attrs(items: list[dict[str, str]]) -> dict[str, str]:
    return {a["key"]: a["value"] for a in items}


def test_dashboard_api_shows_study_trials_and_attributes(storage_url: str) -> None:
    app = optuna_dashboard.wsgi(storage_url)
    summaries = _get(app, "/api/studies")["study_summaries"]
    (summary,) = [s for s in summaries if s["study_name"] == STUDY]
    detail = _get(app, f"/api/studies/{summary['study_id']}?after=0")

    study_attrs = _attrs(detail["user_attrs"])
    for key in ("ctpe:sensitivities", "ctpe:search_space", "ctpe:baselines", "ctpe:settings"):
        assert key in study_attrs, sorted(study_attrs)
    sensitivities = json.loads(study_attrs["ctpe:sensitivities"])
    assert set(sensitivities) == {"conv1", "conv2", "conv3", "fc1", "fc2"}
    assert json.loads(study_attrs["ctpe:baselines"])["fp32"]["accuracy"] > 0.95
    assert detail.get("objective_names") == ["accuracy", "size_kb"]

    trials = detail["trials"]
    assert len(trials) == N_TRIALS and all(t["state"] == "Complete" for t in trials)
    columns = {a["key"] for a in detail["union_user_attrs"]}
    assert {"accuracy", "size_bytes", "compression_ratio", "ctpe:mode"} <= columns
    for trial in trials:
        attrs = _attrs(trial["user_attrs"])
        assert 0 < float(attrs["accuracy"]) <= 1 and float(attrs["compression_ratio"]) > 1
        assert {p["name"] for p in trial["params"]} >= {"bits:conv2", "bits:conv3", "bits:fc1"}
    # The sampler's recorded decisions are visible on the trials it sampled.
    modes = {_attrs(t["user_attrs"]).get("ctpe:mode") for t in trials}
    assert "startup" in modes
    assert detail["best_trials"], "the Pareto front is shown"


# -- a real browser ----------------------------------------------------------------------------

_CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]


def _chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, or skip saying what is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "chromium and chromium-driver are not installed "
            "(apt-get install -y chromium chromium-driver)"
        )
    return browser, driver


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # one line per static file would drown the test output


@pytest.fixture
def dashboard_server(storage_url: str) -> Iterator[str]:
    """optuna-dashboard's WSGI app served on 127.0.0.1 at a free port, in a thread."""
    server = make_server(
        "127.0.0.1", 0, optuna_dashboard.wsgi(storage_url), handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_browser_opens_study_page(dashboard_server: str, storage_url: str) -> None:
    browser, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in _CHROME_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        study_id = optuna.storages.RDBStorage(storage_url).get_study_id_from_name(STUDY)
        wait = WebDriverWait(driver, 60)

        def body() -> str:
            return str(driver.find_element(By.TAG_NAME, "body").text)

        # The study page: the Pareto front of the two named objectives and the study's
        # attributes (sensitivities, search space, baselines), rendered once the API answered.
        driver.get(f"{dashboard_server}/dashboard/studies/{study_id}")
        wait.until(lambda d: "Pareto Front" in body() and "ctpe:sensitivities" in body())
        assert STUDY in body() and "ctpe:baselines" in body()
        screenshot = os.environ.get("OPTUNA_CTPE_SCREENSHOT")
        if screenshot:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            assert driver.save_screenshot(screenshot)
        # The trial list: every trial, and the selected trial's recorded metrics.
        driver.get(f"{dashboard_server}/dashboard/studies/{study_id}/trials")
        wait.until(lambda d: f"{N_TRIALS} Trials" in body() and "compression_ratio" in body())
        assert all(f"Trial {n}" in body() for n in range(N_TRIALS))
        assert "accuracy" in body() and "size_bytes" in body()
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
