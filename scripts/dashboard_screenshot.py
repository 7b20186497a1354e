"""Make docs/dashboard.png, the README's picture of the dashboard, with headless Chromium.

    apt-get install -y chromium chromium-driver && pip install selenium
    python scripts/dashboard_screenshot.py [--page '#/log/requests'] [--out docs/dashboard.png]

It fills a temporary database with sample data, serves it with ``python -m beaver_server``
on a free port, opens the page in Chromium at 1280x1000 and saves the screenshot.
"""
import argparse
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import beaver  # noqa: E402  (this checkout's, not an installed one)

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--hide-scrollbars", "--window-size=1280,1000")


def fill(path):
    """A small web service's database: settings, sessions, jobs, uploads, requests."""
    rng = random.Random(7)
    with beaver.BeaverDB(path) as db:
        db.dict("settings").update({"theme": "dark", "max_upload_mb": 20, "beta": ["search"]})
        sessions = db.dict("sessions")
        for i in range(40):
            sessions.set(f"sess-{i:04x}", {"user": f"user{i}", "ip": f"10.0.0.{i}"},
                         ttl_seconds=rng.randint(60, 7200))
        jobs = db.queue("jobs")
        for i in range(12):
            jobs.put({"task": rng.choice(["resize", "email", "index"]), "id": i},
                     priority=rng.randint(0, 3))
        db.blobs("uploads").put("logo.png", b"\x89PNG" + bytes(2000),
                                {"mimetype": "image/png", "owner": "ada"})
        db.list("audit").extend([{"event": "login", "user": f"user{i}"} for i in range(30)])
        requests = db.log("requests")
        now = time.time()
        for minute in range(240):       # four hours of traffic with a busy hour
            rate = 6 + 5 * math.sin(minute / 38) + (9 if 150 < minute < 190 else 0)
            for _ in range(max(1, int(rng.gauss(rate, 2)))):
                status = rng.choices([200, 404, 500], [90, 7, 3])[0]
                requests.log({"status": status, "path": rng.choice(["/", "/api/items",
                                                                    "/login"]),
                              "ms": round(rng.expovariate(1 / 40), 1)},
                             timestamp=now - (240 - minute) * 60 + rng.random() * 60)
        db.channel("events").publish({"event": "deploy", "version": "1.4.2"})
        articles = db.collection("articles")
        for i, title in enumerate(["SQLite is an embedded database",
                                   "Full-text search with FTS5", "Vectors in one file"]):
            articles.index(beaver.Document(id=f"a{i}", body={"title": title},
                                           embedding=[rng.random() for _ in range(8)]))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(path, port):
    process = subprocess.Popen([sys.executable, "-m", "beaver_server", "--database", path,
                                "--port", str(port), "--log-level", "warning"], cwd=HERE,
                               env={**os.environ, "PYTHONPATH": HERE})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("the server did not start")


def shoot(url, out, folder):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in FLAGS + (f"--user-data-dir={folder}",):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        browser.get(url)
        WebDriverWait(browser, 20).until(lambda b: b.execute_script(
            "return document.querySelector('svg.chart') !== null && "
            "document.querySelectorAll('.paged tbody tr').length > 1"))
        browser.save_screenshot(out)
    finally:
        browser.quit()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--page", default="#/log/requests")
    parser.add_argument("--out", default=os.path.join(HERE, "docs", "dashboard.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "demo.db")
        fill(path)
        port = free_port()
        server = serve(path, port)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            shoot(f"http://127.0.0.1:{port}/ui{args.page}", args.out,
                  os.path.join(folder, "chromium"))
        finally:
            server.terminate()
            server.wait(10)
    print(args.out)


if __name__ == "__main__":
    main()
