"""The built-in dashboard (/dashboard) in headless Chromium, against a real gateway process.

The gateway's log holds chat requests that went through it (the mock upstream, one of them
failing) and logs ingested through POST /api/request-logs/ with chosen models, customers, costs,
metadata and times. The page is driven like a user would: sign in, read the tiles, charts and
table, filter, open a log. Expected figures come from what was sent and from the SQLite log
itself, not from the page's own API answers (except the latency percentiles, which the stats API
estimates from histogram buckets: there the page must show what the API says).

Chromium and chromedriver are Debian's packages (tests/run installs them). Without them the
module fails at collection: the dashboard is never reported as tested when it was not.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.keys import hash_key
from tests.conftest import KEY, GatewayProcess, module_gateway
from tests.mock_upstream import WORDS, MockUpstream

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ADMIN = "sk-admin-dashboard-tests"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
GATEWAY_AUTH = {"Authorization": f"Bearer {KEY}"}
INJECTION = "<img src=x onerror=alert(1)>"
BOLD_INJECTION = '<b data-pwn="1">not bold</b>'
HOUR = 3600.0
WAIT = 15  # seconds: how long the browser may take to show something

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    reason = f"{CHROMIUM} or {CHROMEDRIVER} is missing: install Debian's chromium and chromium-driver (tests/run does)"
    pytest.fail(reason, pytrace=False)

from selenium import webdriver  # noqa: E402 (only once the browser is known to be there)
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# -- the gateway and its log --------------------------------------------------------------------

def ingested_logs(now: float) -> list[dict[str, Any]]:
    """The logs posted to /api/request-logs/: chosen customers, models, costs, times and content."""
    logs: list[dict[str, Any]] = [
        {"model": "claude-x", "customer_identifier": "initech", "cost": 0.25, "latency": 2.0, "time_to_first_token": 0.4,
         "prompt_tokens": 100, "completion_tokens": 50, "timestamp": now - 2 * HOUR, "metadata": {"team": "search"},
         "prompt_messages": [{"role": "system", "content": "Answer briefly."},
                             {"role": "user", "content": "What is the capital of France?"}],
         "completion_message": {"role": "assistant", "content": "Paris is the capital of France."},
         "warnings": "price list is stale",
         "attempts": [{"model": "claude-x", "provider": "anthropic", "status_code": 529, "error": "overloaded"},
                      {"model": "claude-x", "provider": "anthropic", "status_code": 200}]},
        {"model": "gpt-4o", "customer_identifier": "acme", "cost": 0.5, "latency": 1.0, "cache_hit": True,
         "prompt_tokens": 40, "completion_tokens": 20, "timestamp": now - 5 * HOUR, "metadata": {"team": "ads"},
         "prompt_messages": [{"role": "user", "content": "Write a slogan"}],
         "completion_message": {"role": "assistant", "content": "Acme: it just works."}},
        {"model": "gpt-4o", "customer_identifier": "initech", "cost": 0.0, "latency": 30.0, "status_code": 504,
         "error_message": "upstream timeout", "timestamp": now - 0.5 * HOUR,
         "prompt_messages": [{"role": "user", "content": "Summarise this report"}]},
        {"model": "gpt-4o", "customer_identifier": "mallory", "cost": 0.01, "latency": 0.3, "timestamp": now - HOUR,
         "prompt_messages": [{"role": "user", "content": f"Look: {INJECTION}"}],
         "completion_message": {"role": "assistant", "content": BOLD_INJECTION},
         "metadata": {"note": "<script>window.__pwned = 1</script>"}},
        # older than a day: only in the 7-day range
        {"model": "gpt-4o", "customer_identifier": "acme", "cost": 9.0, "latency": 1.0, "timestamp": now - 72 * HOUR,
         "prompt_messages": [{"role": "user", "content": "An old question"}]},
    ]
    # enough rows for a second page of the table (25 a page)
    logs += [{"model": "mini", "customer_identifier": "bulk", "cost": 0.001, "latency": 0.2, "prompt_tokens": 6,
              "completion_tokens": 4, "timestamp": now - (i + 1) * 0.8 * HOUR,
              "prompt_messages": [{"role": "user", "content": f"bulk question {i}"}],
              "completion_message": {"role": "assistant", "content": f"bulk answer {i}"}} for i in range(22)]
    for log in logs:
        log["unique_id"] = uuid.uuid4().hex
    return logs


def chat(gateway: GatewayProcess, model: str, customer: str, text: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "customer_identifier": customer, **extra}
    return httpx.post(f"{gateway.url}/api/chat/completions", json=body, headers=GATEWAY_AUTH, timeout=10)


@pytest.fixture(scope="module")
def gateway(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    yield from module_gateway(tmp_path_factory, "dashboard", mock_upstream,
                              admin_keys=[{"name": "ops", "key_hash": hash_key(ADMIN)}],
                              extra_models=[{"name": "gpt-broken", "provider": "mock", "model": "mock-status-500"}])


@pytest.fixture(scope="module")
def seeded(gateway: GatewayProcess) -> dict[str, Any]:
    """Puts the log in place; returns the logs ingested and every row of the log (read from SQLite)."""
    now = time.time()
    assert chat(gateway, "gpt-test", "acme", "Hello from acme").status_code == 200
    streamed = chat(gateway, "gpt-test", "acme", "Hello again from acme", stream=True,
                    stream_options={"include_usage": True})
    assert streamed.status_code == 200
    assert chat(gateway, "gpt-test", "globex", "Hello from globex").status_code == 200
    assert chat(gateway, "gpt-broken", "globex", "This one fails").status_code == 500
    logs = ingested_logs(now)
    created = httpx.post(f"{gateway.url}/api/request-logs/", json=logs, headers=ADMIN_AUTH, timeout=10)
    assert created.status_code == 201, created.text
    rows = gateway.records(count=4 + len(logs))
    assert len(rows) == 4 + len(logs)
    return {"logs": logs, "rows": rows, "now": now}


def in_last_day(rows: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    return [r for r in rows if r["timestamp"] > now - 24 * HOUR]


# -- the browser --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1440,1800",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def wait(driver: WebDriver, condition: Any, message: str) -> Any:
    return WebDriverWait(driver, WAIT).until(lambda d: condition(d), message)


def by_id(driver: WebDriver, element_id: str) -> WebElement:
    return driver.find_element(By.ID, element_id)


def loads(driver: WebDriver) -> int:
    return int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-loads") or 0)


def settled(driver: WebDriver, after: int) -> bool:
    """The page has finished a load that started after `after` loads, and nothing is in flight."""
    body = driver.find_element(By.TAG_NAME, "body")
    return int(body.get_attribute("data-loads") or 0) > after and body.get_attribute("data-busy") == "0"


def open_signed_out(driver: WebDriver, gateway: GatewayProcess) -> None:
    driver.get(f"{gateway.url}/dashboard")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{gateway.url}/dashboard")
    wait(driver, lambda d: by_id(d, "signin").is_displayed(), "the sign-in form is not shown")


def sign_in(driver: WebDriver, key: str) -> None:
    field = by_id(driver, "admin-key")
    field.clear()
    field.send_keys(key)
    by_id(driver, "signin-submit").click()


def signed_in(driver: WebDriver, gateway: GatewayProcess) -> None:
    open_signed_out(driver, gateway)
    sign_in(driver, ADMIN)
    wait(driver, lambda d: by_id(d, "app").is_displayed() and settled(d, 0), "the dashboard did not load")


def apply_filters(driver: WebDriver, *, loads_data: bool = True, **fields: str) -> None:
    """Set the filter inputs (f-<name>; others cleared) and apply them; wait for the data unless
    `loads_data` is False (a filter the page refuses)."""
    for name in ("model", "customer", "metadata", "search"):
        box = by_id(driver, f"f-{name}")
        box.clear()
        if name in fields:
            box.send_keys(fields[name])
    before = loads(driver)
    by_id(driver, "f-apply").click()
    if loads_data:
        wait(driver, lambda d: settled(d, before), f"the filters {fields} were not applied")


def tile(driver: WebDriver, element_id: str) -> float | None:
    raw = by_id(driver, element_id).get_attribute("data-value")
    return float(raw) if raw else None


def rows(driver: WebDriver) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, "#logs tbody tr.log-row")


def column(driver: WebDriver, name: str) -> list[str]:
    return [cell.text for cell in driver.find_elements(By.CSS_SELECTOR, f"#logs tbody td[data-col={name}]")]


def open_log(driver: WebDriver, row: WebElement) -> WebElement:
    log_id = row.get_attribute("data-id")
    row.click()
    wait(driver, lambda d: by_id(d, "detail").get_attribute("data-id") == log_id, "the detail view did not open")
    return by_id(driver, "detail")


def section_text(driver: WebDriver, testid: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'#detail [data-testid="{testid}"]').text


def save_png(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, f"{path} is not a real screenshot"
    return path


# -- the tests --------------------------------------------------------------------------------

def test_static_files_are_served_without_data(gateway: GatewayProcess) -> None:
    for path in ("/dashboard", "/dashboard/"):
        page = httpx.get(gateway.url + path)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert 'id="signin"' in page.text and "/dashboard/static/app.js" in page.text
    script = httpx.get(f"{gateway.url}/dashboard/static/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    style = httpx.get(f"{gateway.url}/dashboard/static/app.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    again = httpx.get(f"{gateway.url}/dashboard/static/app.js", headers={"If-None-Match": script.headers["etag"]})
    assert again.status_code == 304
    for missing in ("nope.js", "..%2F__init__.py", "..%2F..%2Fapp.py", "__init__.py"):
        assert httpx.get(f"{gateway.url}/dashboard/static/{missing}").status_code == 404, missing
    assert httpx.get(f"{gateway.url}/dashboard/static/../__init__.py").status_code == 404


def test_sign_in_refuses_wrong_and_gateway_keys(browser: WebDriver, gateway: GatewayProcess) -> None:
    open_signed_out(browser, gateway)
    assert not by_id(browser, "app").is_displayed()
    assert not by_id(browser, "signin-error").is_displayed()

    sign_in(browser, "sk-not-a-key")
    wait(browser, lambda d: by_id(d, "signin-error").is_displayed(), "no error for a wrong key")
    assert "invalid" in by_id(browser, "signin-error").text
    assert not by_id(browser, "app").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('llmrelay.adminKey')") is None

    sign_in(browser, KEY)
    wait(browser, lambda d: "admin key" in by_id(d, "signin-error").text, "no 403 message for a gateway key")
    assert not by_id(browser, "app").is_displayed()

    sign_in(browser, ADMIN)
    wait(browser, lambda d: by_id(d, "app").is_displayed(), "the admin key did not open the dashboard")
    assert browser.execute_script("return sessionStorage.getItem('llmrelay.adminKey')") == ADMIN
    browser.refresh()  # the key stays for the tab's session
    wait(browser, lambda d: by_id(d, "app").is_displayed() and settled(d, 0), "signed out by a reload")
    by_id(browser, "sign-out").click()
    wait(browser, lambda d: by_id(d, "signin").is_displayed(), "sign out did not return to the form")
    assert browser.execute_script("return sessionStorage.getItem('llmrelay.adminKey')") is None


def test_tiles_charts_and_table_show_the_log(browser: WebDriver, gateway: GatewayProcess,
                                            seeded: dict[str, Any]) -> None:
    signed_in(browser, gateway)
    day = in_last_day(seeded["rows"], seeded["now"])
    assert len(day) == 30  # 4 chats + 4 chosen logs + 22 bulk ones

    assert tile(browser, "tile-requests") == 30
    assert by_id(browser, "tile-requests").text == "30"
    assert tile(browser, "tile-cost") == pytest.approx(sum(r["cost"] for r in day))
    assert tile(browser, "tile-tokens") == sum(r["total_request_tokens"] for r in day)
    errors = [r for r in day if r["status"] == "error"]
    assert len(errors) == 2  # the failed chat and the ingested timeout
    assert tile(browser, "tile-error-rate") == pytest.approx(2 / 30)
    assert by_id(browser, "tile-error-rate").text == "6.7%"
    assert tile(browser, "tile-cache-hit-rate") == pytest.approx(1 / 30)
    stats = httpx.get(f"{gateway.url}/api/dashboard/stats/", headers=ADMIN_AUTH).json()
    for prefix, name in (("latency", "latency"), ("ttft", "time_to_first_token")):
        for p in ("p50", "p90", "p99"):
            assert tile(browser, f"{prefix}-{p}") == pytest.approx(stats["percentiles"][name][p]), (prefix, p)
            assert by_id(browser, f"{prefix}-{p}").text not in ("", "–")

    requests_chart = by_id(browser, "chart-requests")
    assert requests_chart.find_elements(By.CSS_SELECTOR, "svg rect.bar[data-series=errors]")
    assert requests_chart.find_elements(By.CSS_SELECTOR, "svg rect.bar[data-series=successful]")
    model_series = {e.get_attribute("data-series") for e in
                    by_id(browser, "chart-spend-model").find_elements(By.CSS_SELECTOR, "svg rect.bar")}
    assert {"claude-x", "gpt-4o", "mini"} <= model_series
    customer_series = {e.get_attribute("data-series") for e in
                       by_id(browser, "chart-spend-customer").find_elements(By.CSS_SELECTOR, "svg rect.bar")}
    assert {"acme", "initech", "bulk"} <= customer_series
    assert by_id(browser, "chart-tokens").find_elements(By.CSS_SELECTOR, "svg rect.bar[data-series=prompt]")

    top_customers = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#top-customers tbody td:first-child")]
    assert top_customers[:2] == ["acme", "initech"]  # 0.5 + two chats, then 0.25
    top_models = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#top-models tbody td:first-child")]
    assert top_models[0] == "gpt-4o"

    assert len(rows(browser)) == 25
    assert "30 requests" in by_id(browser, "log-count").text
    assert by_id(browser, "page-info").text == "Page 1 of 2"
    assert {"acme", "globex", "initech", "mallory", "bulk"} <= set(column(browser, "customer"))
    save_png(browser, "dashboard.png")

    before = loads(browser)
    by_id(browser, "page-next").click()
    wait(browser, lambda d: settled(d, before), "page 2 did not load")
    assert len(rows(browser)) == 5
    assert by_id(browser, "page-info").text == "Page 2 of 2"
    assert not by_id(browser, "page-next").is_enabled()

    # the 7-day range takes in the old log too
    before = loads(browser)
    browser.find_element(By.CSS_SELECTOR, "#f-range option[value='604800']").click()
    wait(browser, lambda d: settled(d, before), "the 7-day range did not load")
    assert tile(browser, "tile-requests") == 31
    assert tile(browser, "tile-cost") == pytest.approx(sum(r["cost"] for r in day) + 9.0)


def test_filters_narrow_table_and_tiles(browser: WebDriver, gateway: GatewayProcess, seeded: dict[str, Any]) -> None:
    signed_in(browser, gateway)

    apply_filters(browser, customer="initech")
    assert set(column(browser, "customer")) == {"initech"} and len(rows(browser)) == 2
    assert tile(browser, "tile-requests") == 2
    assert tile(browser, "tile-cost") == pytest.approx(0.25)
    assert tile(browser, "tile-tokens") == 150
    assert tile(browser, "tile-error-rate") == pytest.approx(0.5)
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#top-customers tbody td:first-child")] == ["initech"]

    apply_filters(browser, customer="acme", model="mock-ok")  # the model that served: gpt-test's upstream name
    assert len(rows(browser)) == 2 and set(column(browser, "model")) == {"mock-ok"}
    assert tile(browser, "tile-requests") == 2

    apply_filters(browser, metadata="team=ads")
    assert column(browser, "customer") == ["acme"] and tile(browser, "tile-cache-hit-rate") == 1.0

    apply_filters(browser, search="CAPITAL of france")  # case-insensitive, in the prompt
    assert column(browser, "model") == ["claude-x"] and tile(browser, "tile-requests") == 1
    apply_filters(browser, search="it just works")  # in the completion
    assert column(browser, "customer") == ["acme"]

    apply_filters(browser)
    before = loads(browser)
    browser.find_element(By.CSS_SELECTOR, "#f-status option[value='error']").click()
    wait(browser, lambda d: settled(d, before), "the status filter was not applied")
    assert sorted(column(browser, "customer")) == ["globex", "initech"]
    assert tile(browser, "tile-error-rate") == 1.0

    apply_filters(browser, customer="nobody")
    assert not rows(browser) and by_id(browser, "logs-empty").is_displayed()
    assert tile(browser, "tile-requests") == 0

    apply_filters(browser, metadata='bad"key=1', loads_data=False)  # the API's 400, shown on the page
    wait(browser, lambda d: "metadata key" in by_id(d, "error").text, "the API's error is not shown")
    apply_filters(browser, metadata="no-equals-sign", loads_data=False)
    wait(browser, lambda d: "key=value" in by_id(d, "error").text, "no error for a metadata filter without '='")


def test_detail_view_shows_the_whole_log(browser: WebDriver, gateway: GatewayProcess, seeded: dict[str, Any]) -> None:
    signed_in(browser, gateway)
    apply_filters(browser, customer="initech", model="claude-x")
    detail = open_log(browser, rows(browser)[0])
    assert detail.is_displayed()
    prompt = section_text(browser, "detail-prompt")
    assert "Answer briefly." in prompt and "What is the capital of France?" in prompt
    assert "Paris is the capital of France." in section_text(browser, "detail-completion")
    metadata = section_text(browser, "detail-metadata")
    assert "team" in metadata and "search" in metadata
    assert "price list is stale" in section_text(browser, "detail-warnings")
    assert "overloaded" in section_text(browser, "detail-attempts")
    expected = next(log for log in seeded["logs"] if log["model"] == "claude-x")
    fields = section_text(browser, "detail-fields")
    assert expected["unique_id"] in fields and "tokens_per_second" in fields
    save_png(browser, "dashboard-detail.png")
    raw = browser.find_element(By.CSS_SELECTOR, '#detail [data-testid="detail-raw"]')
    raw.find_element(By.TAG_NAME, "summary").click()
    assert '"customer_identifier": "initech"' in raw.text
    by_id(browser, "detail-close").click()
    assert not detail.is_displayed()

    # a chat that went through the gateway: the mock's answer is in the completion
    apply_filters(browser, customer="globex", model="mock-ok")
    open_log(browser, rows(browser)[0])
    assert "Hello from globex" in section_text(browser, "detail-prompt")
    assert "".join(WORDS) in section_text(browser, "detail-completion")


def test_logged_markup_is_shown_as_text(browser: WebDriver, gateway: GatewayProcess, seeded: dict[str, Any]) -> None:
    signed_in(browser, gateway)
    apply_filters(browser, search="onerror")
    assert column(browser, "customer") == ["mallory"]
    open_log(browser, rows(browser)[0])
    assert INJECTION in section_text(browser, "detail-prompt")
    assert BOLD_INJECTION in section_text(browser, "detail-completion")
    assert "<script>window.__pwned = 1</script>" in section_text(browser, "detail-metadata")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 (reading it is the check)
    assert browser.find_elements(By.TAG_NAME, "img") == []
    assert browser.find_elements(By.CSS_SELECTOR, "[data-pwn]") == []
    assert browser.find_elements(By.CSS_SELECTOR, "#detail script") == []
    assert browser.execute_script("return window.__pwned") is None


def test_no_script_errors_or_policy_violations(browser: WebDriver, gateway: GatewayProcess,
                                               seeded: dict[str, Any]) -> None:
    browser.get_log("browser")  # drop what earlier tests left (their 401/403 answers are logged)
    signed_in(browser, gateway)
    open_log(browser, rows(browser)[0])
    problems = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert problems == [], "\n".join(problems)
