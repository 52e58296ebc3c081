#!/usr/bin/env python3
"""The web console in a real browser against a real `colony dev` cluster.

Starts `colony dev` (3 servers, 2 executors, the learner) in its own directory, waits for the
demo workflow, adds a little work (tasks that hold resources, short tasks for the learner, a
workflow to watch live), then drives headless Chromium through every view with Playwright:
sign-in refuses a bad token; the overview shows 3 members and one leader; executors show
allocation bars; tasks filter by state and namespace; the demo workflow is drawn as a DAG with
its step states and a running one updates without a reload; models show their holdout error; an
agent started through the CLI shows its 2 running instances, and a third after a scale without a
reload; a token of another namespace sees none of the cluster's tasks, workflows or agents.
Screenshots go to docs/console-*.png. tests/console/run.sh installs what this needs and runs it.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
COLONY = os.environ.get("COLONY_BIN") or str(
    Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/colony/target")) / "release/colony"
)
BASE_PORT = int(os.environ.get("COLONY_CONSOLE_BASE_PORT", "7301"))
# How long each wait may take before the test fails, saying what it waited for.
CLUSTER_TIMEOUT_S = 120
DEMO_TIMEOUT_S = 120
MODEL_TIMEOUT_S = 180
AGENT_TIMEOUT_S = 60
# The agent the test runs: what it runs must never reach the page.
AGENT = "console-demo"
AGENT_COMMAND = ["/bin/sleep", "3600"]
UI_TIMEOUT_MS = 20_000
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

ENDPOINTS = ",".join(f"127.0.0.1:{BASE_PORT + i}" for i in range(3))
CONSOLE = f"http://127.0.0.1:{BASE_PORT + 1000}"
# The live workflow: a first step that takes a while, so the page sees it running, then a second.
LIVE_WORKFLOW = """\
name: live
steps:
  - name: warm-up
    run: [sleep, "6"]
  - name: fan-in
    after: [warm-up]
    run: ["true"]
"""


class Failed(Exception):
    pass


def wait_for(what, timeout_s, check, interval_s=1.0):
    """Polls `check` until it returns something truthy; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - reported if the wait runs out
            last = error
        time.sleep(interval_s)
    raise Failed(f"timed out after {timeout_s}s waiting for {what}" + (f" (last error: {last})" if last else ""))


def api(path, token=None, server=CONSOLE):
    """GET /ui/api/PATH: (HTTP status, decoded JSON body)."""
    request = urllib.request.Request(f"{server}/ui/api/{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def colony(token, *args):
    """Runs the CLI against the cluster; its stdout."""
    out = subprocess.run(
        [COLONY, "--endpoint", ENDPOINTS, "--token", token, *args],
        capture_output=True, text=True, timeout=60,
    )
    if out.returncode != 0:
        raise Failed(f"colony {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def port_free(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


class Cluster:
    """`colony dev` in the background, in its own process group, stopped with SIGTERM."""

    def __init__(self, directory):
        self.dir = Path(directory)
        busy = [p for p in [BASE_PORT + i for i in range(3)] + [BASE_PORT + 1000 + i for i in range(3)] if not port_free(p)]
        if busy:
            raise Failed(f"ports {busy} are in use: set COLONY_CONSOLE_BASE_PORT to a free range")
        self.out = open(self.dir / "dev.out", "w")
        self.process = subprocess.Popen(
            [COLONY, "dev", "--dir", str(self.dir / "cluster"), "--base-port", str(BASE_PORT),
             # Their tasks' ids would move the learner's holdout split (see the agents check).
             "--no-demo-agents"],
            stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )

    def output(self):
        return (self.dir / "dev.out").read_text(errors="replace")

    def alive(self):
        if self.process.poll() is not None:
            raise Failed(f"colony dev exited ({self.process.returncode}):\n{self.output()[-3000:]}")
        return True

    def log(self, name):
        path = self.dir / "cluster" / name
        return path.read_text(errors="replace")[-3000:] if path.exists() else f"({path} is missing)"

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.out.close()


def learner_task(token, i):
    """`sh -c 'sleep S' job arg...`: runtime grows with the argument count, which the learner's
    model can see and the per-kind baseline cannot (as tests/it/t90_learner.rs does)."""
    extra = i % 4
    seconds = ["0.02", "0.15", "0.3", "0.45"][extra]
    args = ["sh", "-c", f"sleep {seconds}", "job"] + [f"arg{n}" for n in range(extra)]
    colony(token, "task", "submit", "--name", f"learn-{i}", "--", *args)


def loaded(page, path):
    """Waits until the view polling `path` has its first answer."""
    view = page.locator(f'[data-test=view][data-loaded=true][data-path="{path}"]')
    expect(view).to_have_count(1)
    return view


def task_rows(page):
    """(state, namespace) of every task row shown."""
    rows = page.locator("[data-test=task]").evaluate_all(
        "rows => rows.map(r => [r.dataset.state, r.dataset.namespace])")
    return [tuple(row) for row in rows]


def screenshot(page, name, full_page=True):
    path = ROOT / "docs" / f"console-{name}.png"
    page.wait_for_timeout(300)
    page.screenshot(path=str(path), full_page=full_page)
    print(f"  screenshot {path.relative_to(ROOT)}")


def run(cluster, workdir):
    # ---- the cluster and its demo workload ----
    token_file = cluster.dir / "cluster" / "token"
    wait_for("colony dev to write its management token", CLUSTER_TIMEOUT_S,
             lambda: cluster.alive() and token_file.exists() and token_file.read_text().strip())
    token = token_file.read_text().strip()

    def cluster_ready():
        cluster.alive()
        status, body = api("overview", token)
        voters = [m for m in body.get("members", []) if m["role"] == "voter"] if status == 200 else []
        executors = body.get("executors_by_state", {}).get("up", 0) if status == 200 else 0
        return len(voters) == 3 and body.get("leader_id") and executors == 2
    wait_for("3 voters, a leader and 2 executors up (the console's overview)", CLUSTER_TIMEOUT_S, cluster_ready)

    def demo_done():
        cluster.alive()
        _, body = api("workflows", token)
        research = [w for w in body.get("workflows", []) if w["name"] == "research"]
        if research and research[0]["state"] not in ("running",):
            return research[0]
        return None
    demo = wait_for("the demo workflow `research` to end", DEMO_TIMEOUT_S, demo_done)
    if demo["state"] != "succeeded":
        raise Failed(f"the demo workflow ended {demo['state']}: {demo['reason']}")
    print(f"cluster up; demo workflow {demo['id']} succeeded")

    # Work in the default namespace: two tasks that hold CPU and memory for the screenshots, and
    # short tasks that give the learner its examples.
    for n in range(2):
        colony(token, "task", "submit", "--name", f"hold-{n}", "--cpu", "1500m", "--memory", "768Mi",
               "--", "sleep", "600")
    for i in range(120):
        learner_task(token, i)
    reader = json.loads(colony(token, "--output", "json", "acl", "token", "create", "--role", "reader",
                               "--namespace", "elsewhere", "--ttl", "1h",
                               "--description", "console test: another namespace"))["secret"]
    submitter = json.loads(colony(token, "--output", "json", "acl", "token", "create", "--role", "submitter",
                                  "--namespace", "elsewhere", "--ttl", "1h",
                                  "--description", "console test: no cluster reads"))["secret"]

    # ---- the API without a browser: the token decides ----
    status, body = api("tasks")
    assert status == 401 and "credentials" in body["error"], (status, body)
    status, body = api("tasks", "colony1.not.a-token")
    assert status == 401 and body["code"] == "unauthenticated", (status, body)
    status, body = api("tasks?limit=200", reader)
    assert status == 200 and body["tasks"] == [], f"a token of namespace elsewhere saw tasks: {body}"
    status, body = api(f"workflows/{demo['id']}", reader)
    assert status == 403, f"another namespace's workflow answered {status}: {body}"
    status, body = api("executors", submitter)
    assert status == 403 and body["code"] == "permission_denied", (status, body)
    with urllib.request.urlopen(f"{CONSOLE}/ui/app.js", timeout=10) as response:
        assert response.status == 200, "static files need no token"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 860})
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        expect.set_options(timeout=UI_TIMEOUT_MS)
        problems = []
        requests = []
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on("request", lambda request: requests.append(request.url))

        # ---- sign in: a bad token is refused, the management token is taken ----
        page.goto(f"{CONSOLE}/ui/")
        page.fill("#token", "colony1.0000.not-a-secret")
        page.click("button[type=submit]")
        expect(page.locator("[data-test=login-error]")).to_contain_text("Refused")
        expect(page.locator("[data-test=login]")).to_be_visible()
        page.fill("#token", token)
        page.click("button[type=submit]")

        # ---- overview: 3 members, one leader, the term ----
        members = page.locator("[data-test=member]")
        expect(members).to_have_count(3)
        expect(page.locator("[data-test=member][data-leader=true]")).to_have_count(1)
        expect(page.locator("[data-test=member-count]")).to_have_text("3")
        expect(page.locator("[data-test=term]")).to_have_text(re.compile(r"^[1-9]\d*$"))
        expect(page.locator("[data-test=as-of]")).to_contain_text("as of its applied index")
        # Live: the applied index moves as the learner's tasks commit, without a reload.
        first = page.inner_text("[data-test=as-of]")
        wait_for("the overview to update itself", 30, lambda: page.inner_text("[data-test=as-of]") != first, 0.5)
        screenshot(page, "overview")
        print("overview: 3 members, 1 leader")

        # ---- executors: two, each with cpu, memory and gpu bars; the held tasks show ----
        page.click("[data-nav=executors]")
        expect(page.locator("[data-test=executor]")).to_have_count(2)
        expect(page.locator("[data-test=executor] [data-test=bar]")).to_have_count(6)

        def allocated_cpu():
            bars = page.locator("[data-test=bar][data-resource=cpu]")
            return sum(int(bars.nth(i).get_attribute("data-used")) for i in range(bars.count()))
        wait_for("the held tasks' CPU on the executor bars", 60, lambda: allocated_cpu() >= 3000, 0.5)
        screenshot(page, "executors")
        print("executors: 2 with bars")

        # ---- tasks: filtered by state, then by namespace ----
        page.click("[data-nav=tasks]")
        loaded(page, "tasks?limit=50")
        page.select_option("[data-test=task-filters] select[name=state]", "running")
        page.click("[data-test=task-filters] button[type=submit]")
        loaded(page, "tasks?state=running&limit=50")
        rows = task_rows(page)
        assert rows and {state for state, _ in rows} == {"running"}, f"the running filter shows {rows}"
        page.select_option("[data-test=task-filters] select[name=state]", "succeeded")
        page.fill("[data-test=task-filters] input[name=namespace]", "demo")
        page.click("[data-test=task-filters] button[type=submit]")
        loaded(page, "tasks?state=succeeded&namespace=demo&limit=50")
        rows = task_rows(page)
        assert len(rows) == 5 and set(rows) == {("succeeded", "demo")}, rows
        page.select_option("[data-test=task-filters] select[name=state]", "")
        page.fill("[data-test=task-filters] input[name=namespace]", "default")
        page.click("[data-test=task-filters] button[type=submit]")
        loaded(page, "tasks?namespace=default&limit=50")
        rows = task_rows(page)
        assert len(rows) == 50 and {ns for _, ns in rows} == {"default"}, rows
        expect(page.locator("[data-test=next-page]")).to_be_visible()  # 122 tasks, 50 a page
        screenshot(page, "tasks", full_page=False)
        print("tasks: state and namespace filters")

        # ---- workflows: the demo as a DAG with its step states ----
        page.click("[data-nav=workflows]")
        page.click("[data-test=workflow][data-name=research] a >> nth=0")
        dag = page.locator("svg[data-test=dag]")
        expect(dag).to_be_visible()
        for step in ["research", "analyze", "report"]:
            expect(dag.locator(f"[data-test=step][data-step={step}]")).to_have_attribute("data-state", "succeeded")
        edges = set(map(tuple, dag.locator("[data-test=edge]").evaluate_all(
            "paths => paths.map(p => [p.dataset.from, p.dataset.to])")))
        assert {("research", "analyze"), ("analyze", "report"), ("research", "report")} <= edges, edges
        screenshot(page, "workflow")
        print("workflow: research drawn with 3 succeeded steps")

        # A workflow submitted now: the page shows it running, then done, without a reload.
        live_file = Path(workdir) / "live.yaml"
        live_file.write_text(LIVE_WORKFLOW)
        live_id = colony(token, "workflow", "submit", str(live_file)).strip().split()[-1]
        page.goto(f"{CONSOLE}/ui/#/workflows/{live_id}")
        warm_up = page.locator("[data-test=step][data-step=warm-up]")
        expect(warm_up).to_have_attribute("data-state", "running")
        expect(page.locator("[data-test=step][data-step=fan-in]")).to_have_attribute("data-state", "waiting")
        screenshot(page, "workflow-running")
        expect(page.locator("[data-test=step][data-step=fan-in]")).to_have_attribute(
            "data-state", "succeeded", timeout=60_000)
        print(f"workflow {live_id}: running -> succeeded, live")

        # ---- models: the learner's versions with their holdout error ----
        page.click("[data-nav=models]")
        try:
            expect(page.locator("[data-test=model]").first).to_be_visible(timeout=MODEL_TIMEOUT_S * 1000)
        except AssertionError:
            raise Failed(f"no model was published within {MODEL_TIMEOUT_S}s; the learner's log:\n"
                         + cluster.log("learner.log"))
        mse = float(page.inner_text("[data-test=model] [data-test=holdout-mse] >> nth=0"))
        assert mse >= 0, mse
        screenshot(page, "models")
        print(f"models: version published, holdout MSE {mse}")

        # ---- agents: the CLI's agent with its 2 instances running, then 3 after a scale, live ----
        # Started only now: its instances' task ids would move the learner's holdout split (it
        # splits by task id), which the model check above depends on.
        colony(token, "agent", "run", "--name", AGENT, "--replicas", "2", "--restart", "always",
               "--", *AGENT_COMMAND)
        status, body = api("agents", token)
        assert status == 200 and [(a["namespace"], a["name"]) for a in body["agents"]] == [("default", AGENT)], \
            (status, body)
        assert AGENT_COMMAND[0] not in json.dumps(body), f"the agents API shows what the agent runs: {body}"
        status, body = api("agents", reader)
        assert status == 200 and body["agents"] == [] and body["total"] == 0, \
            f"a token of namespace elsewhere saw agents: {body}"
        page.click("[data-nav=agents]")
        loaded(page, "agents")
        agent = page.locator(f"[data-test=agent][data-namespace=default][data-name={AGENT}]")
        expect(agent).to_have_attribute("data-running", "2", timeout=AGENT_TIMEOUT_S * 1000)
        expect(agent).to_have_attribute("data-state", "running")
        expect(agent.locator("[data-test=agent-instance][data-state=running]")).to_have_count(2)
        expect(agent.locator("[data-test=agent-instance]")).to_have_count(2)
        expect(agent.locator("[data-test=agent-running]")).to_have_text("2 / 2")
        expect(agent.locator("[data-test=agent-replicas]")).to_have_text("2")
        # Without a health check a running instance is healthy: registered at its executor's host.
        expect(agent.locator("[data-test=agent-endpoint]").first).to_have_text("127.0.0.1",
                                                                             timeout=AGENT_TIMEOUT_S * 1000)
        expect(page.locator("[data-test=as-of]")).to_contain_text("from its applied state")
        assert AGENT_COMMAND[0] not in page.inner_text("main"), "the Agents view shows what the agent runs"
        screenshot(page, "agents")
        colony(token, "agent", "scale", AGENT, "3")
        expect(agent).to_have_attribute("data-running", "3", timeout=AGENT_TIMEOUT_S * 1000)
        expect(agent.locator("[data-test=agent-replicas]")).to_have_text("3")
        print(f"agents: {AGENT} with 2 running instances, 3 after a scale, live")

        # ---- another namespace's token: none of the cluster's tasks ----
        page.click("[data-test=sign-out]")
        page.fill("#token", reader)
        page.click("button[type=submit]")
        page.click("[data-nav=tasks]")
        loaded(page, "tasks?limit=50")
        expect(page.locator("[data-test=no-tasks]")).to_be_visible()
        expect(page.locator("[data-test=task]")).to_have_count(0)
        page.goto(f"{CONSOLE}/ui/#/tasks?namespace=default")
        loaded(page, "tasks?namespace=default&limit=50")
        expect(page.locator("[data-test=no-tasks]")).to_be_visible()
        expect(page.locator("[data-test=task]")).to_have_count(0)
        page.click("[data-nav=workflows]")
        loaded(page, "workflows?limit=200")
        expect(page.locator("[data-test=no-workflows]")).to_be_visible()
        page.click("[data-nav=agents]")
        loaded(page, "agents")
        expect(page.locator("[data-test=no-agents]")).to_be_visible()
        expect(page.locator("[data-test=agent]")).to_have_count(0)
        page.goto(f"{CONSOLE}/ui/#/workflows/{demo['id']}")
        loaded(page, f"workflows/{demo['id']}")
        expect(page.locator("[data-test=error][data-status='403']")).to_be_visible()
        screenshot(page, "other-namespace")
        print("reader of namespace elsewhere: no tasks, no workflows, no agents, 403 on the demo workflow")
        # A token without cluster reads sees the refusal, not an empty list.
        page.click("[data-test=sign-out]")
        page.fill("#token", submitter)
        page.click("button[type=submit]")
        page.click("[data-nav=executors]")
        loaded(page, "executors")
        expect(page.locator("[data-test=error][data-status='403']")).to_contain_text("may not")

        origins = {re.match(r"^[a-z]+://[^/]+", url).group(0) for url in requests if not url.startswith("data:")}
        assert origins == {CONSOLE}, f"the page fetched from elsewhere: {origins}"
        assert not problems, problems
        browser.close()


def main():
    if not os.access(COLONY, os.X_OK):
        sys.exit(f"error: {COLONY} is missing; build it (tests/console/run.sh does)")
    (ROOT / "docs").mkdir(exist_ok=True)
    keep = os.environ.get("COLONY_CONSOLE_KEEP")
    workdir = tempfile.mkdtemp(prefix="colony-console-")
    os.chmod(workdir, 0o711)
    cluster = Cluster(workdir)
    try:
        run(cluster, workdir)
    except (Failed, AssertionError) as error:
        print(f"FAILED: {error}", file=sys.stderr)
        print(f"colony dev's output and logs: {workdir}", file=sys.stderr)
        cluster.stop()
        sys.exit(1)
    cluster.stop()
    if not keep:
        subprocess.run(["rm", "-rf", workdir], check=False)
    print("console test passed")


if __name__ == "__main__":
    main()
