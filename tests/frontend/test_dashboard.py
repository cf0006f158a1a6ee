"""The live view: `/admin/dashboard.json` on an in-process app, and `/dashboard` in headless Chromium
against a real `faasmoe serve` with a worker (its DOM and a screenshot).

Chromium is Debian's `chromium` package (`.ci/run` installs it); without it the browser test skips.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
import pytest_asyncio
import torch
from aiohttp import web

from faasmoe.api.app import FrontendContext, create_app
from faasmoe.engine.deployments import Deployment, Deployments, DeploymentSpec
from faasmoe.engine.executors import InProcessExpertExecutor, RemoteExpertExecutor
from faasmoe.engine.hits import RecentHits
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
from faasmoe.model.config import MoEConfig
from faasmoe.model.experts import LocalExpertExecutor
from faasmoe.model.moe_model import load_expert_blocks
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint
from faasmoe.tenancy.admission import Admission
from faasmoe.tenancy.ledger import UsageLedger
from faasmoe.tenancy.tenants import TenantStore
from runtime import protocol as p
from runtime.cluster import workers_json
from runtime.compute import ComputeThread

from ..processes import faasmoe, free_port

ADMIN_KEY = "admin-dashboard-secret"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
DEVICE_COLOUR = (0x1F, 0x9D, 0x8B)  # --device in dashboard.css: a resident block's cell


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("dashboard") / "tiny", "qwen2_moe", seed=5, progress=False)


# --- the hit counter -----------------------------------------------------------------------------------


def test_recent_hits_count_per_second_and_forget_past_the_horizon() -> None:
    hits = RecentHits(["a", "b"], horizon_s=10)
    hits.record(["a", "a", "b", "unknown"], cold_starts=1, now=100.2)
    hits.record(["a"], now=105.9)
    assert hits.recent(10, now=106.0) == {"a": 3, "b": 1}
    assert hits.recent(3, now=106.0) == {"a": 1, "b": 0}  # seconds 104..106
    assert hits.recent(60, now=106.0) == {"a": 3, "b": 1}  # capped at the horizon
    hits.record(["b"], now=110.5)  # second 110 reuses the column of second 100
    assert hits.recent(10, now=110.5) == {"a": 1, "b": 1}
    assert hits.recent(10, now=125.0) == {"a": 0, "b": 0}
    assert (hits.calls, hits.cold_starts) == (5, 1)


# --- the JSON endpoint on an in-process app -----------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(checkpoint: Path, tmp_path_factory):
    """`tiny` (shared, remote experts on a stand-in client: residency from fake worker stats) and `secret`
    (private to beta, in-process experts, so it can generate)."""
    compute = ComputeThread("trunk")
    state = tmp_path_factory.mktemp("state") / "state.db"
    tenants, ledger = TenantStore(state), UsageLedger(state)
    keys = {name: tenants.add_tenant(name, **limits)[1] for name, limits in
            {"acme": {}, "beta": {}, "ops": {"admin": True}}.items()}
    keys["admin"] = ADMIN_KEY

    def remote(dep: Deployment) -> RemoteExpertExecutor:
        return RemoteExpertExecutor(SimpleNamespace(routes={}), dep.name, dep.spec.path, dep.config, dep.block_size,
                                    torch.float32, 60.0)

    def local(dep: Deployment) -> InProcessExpertExecutor:
        blocks = load_expert_blocks(ExpertLayout(CheckpointReader(dep.spec.path), dep.config), dep.block_size,
                                    torch.float32, torch.device("cpu"))
        return InProcessExpertExecutor(LocalExpertExecutor(blocks, dep.block_size), compute, dep.name)

    deployments = Deployments()
    deployments.add(Deployment(DeploymentSpec("tiny", checkpoint, expert_block_size=4), remote, compute))
    deployments.add(Deployment(DeploymentSpec("secret", checkpoint, sharing="private", owner="beta",
                                              expert_block_size=2), local, compute))
    specs = deployments.by_name["tiny"].executor.functions

    async def cluster_state() -> dict:  # one worker: two blocks on its device, one in its host cache
        info = p.WorkerInfo("w0", "unix:/tmp/w0.sock", "cpu", os.getpid(), 2**30, 2**29, socket.gethostname())
        held = [p.ResidentFunction(s, "device", s.nbytes) for s in specs[:2]] + [p.ResidentFunction(specs[2], "host",
                                                                                                    specs[2].nbytes)]
        return {"workers": workers_json([p.Stats(0, info, held, {"host_bytes": specs[2].nbytes})]), "models": {}}

    async def runtime_metrics() -> str:
        return ""

    ctx = FrontendContext(deployments, tenants, None, ADMIN_KEY, Admission(), ledger, cluster_state, runtime_metrics)
    runner = web.AppRunner(create_app(ctx))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", keys=keys, deployments=deployments, specs=specs)
    await runner.cleanup()
    await deployments.stop()
    compute.shutdown()
    tenants.close()
    ledger.close()


async def get(server, path: str, key: str | None) -> tuple[int, dict, object]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as session, session.get(server.url + path, headers=headers) as resp:
        text = await resp.text()
        try:
            return resp.status, dict(resp.headers), json.loads(text)
        except ValueError:
            return resp.status, dict(resp.headers), text


@pytest.mark.asyncio(loop_scope="module")
async def test_the_json_needs_the_admin_key(server) -> None:
    status, headers, body = await get(server, "/admin/dashboard.json", None)
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer" and body["error"]["type"] == "authentication_error"
    assert (await get(server, "/admin/dashboard.json", "sk-wrong"))[0] == 401
    for tenant in ("acme", "beta"):  # beta owns a private model, but is no admin
        status, _, body = await get(server, "/admin/dashboard.json", server.keys[tenant])
        assert status == 403 and body["error"]["code"] == "forbidden", body
    for admin in ("admin", "ops"):  # the admin key, or an admin tenant's
        assert (await get(server, "/admin/dashboard.json", server.keys[admin]))[0] == 200


@pytest.mark.asyncio(loop_scope="module")
async def test_the_json_has_residency_workers_usage_and_series(server) -> None:
    status, headers, d = await get(server, "/admin/dashboard.json", ADMIN_KEY)
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert set(d) == {"time", "window_s", "models", "workers", "frontend", "cluster_error", "usage", "series"}
    models = {m["name"]: m for m in d["models"]}
    tiny = models["tiny"]
    config = server.deployments.by_name["tiny"].config
    assert [row["layer"] for row in tiny["layers"]] == config.moe_layers
    assert tiny["blocks"] == [[0, 4], [4, 4], [8, 4], [12, 4]] and tiny["num_experts"] == 16
    tiers = {(row["layer"], b): t for row in tiny["layers"] for b, t in enumerate(row["tiers"])}
    by_id = {s.function_id: (s.layer, s.first // 4) for s in server.specs}
    assert [tiers[by_id[s.function_id]] for s in server.specs[:3]] == ["device", "device", "host"]
    assert tiny["resident"] == {"device": 2, "host": 1, "cold": len(server.specs) - 3}
    (worker,) = d["workers"]
    assert (worker["id"], worker["device_functions"], worker["host_functions"]) == ("w0", 2, 1)
    assert "resident_functions" not in worker  # counted, not listed: a big model has thousands
    assert worker["rss_bytes"] > 0 and d["frontend"]["rss_bytes"] > 0  # on this machine: psutil knows its RSS
    assert set(d["series"]) == {"t", "cold_starts", "calls", "requests", "ttft_avg_s", "ttft_max_s"}
    assert d["usage"]["ledger"] is True and d["cluster_error"] is None
    assert (await get(server, "/admin/dashboard.json?window=0", ADMIN_KEY))[0] == 400
    assert (await get(server, "/admin/dashboard.json?since=yesterday-ish", ADMIN_KEY))[0] == 400


@pytest.mark.asyncio(loop_scope="module")
async def test_private_models_and_their_calls_are_shown_to_the_admin_only(server) -> None:
    async with aiohttp.ClientSession() as session:
        body = {"model": "secret", "prompt": "hello experts", "max_tokens": 3, "temperature": 0}
        async with session.post(server.url + "/v1/completions", json=body,
                                headers={"Authorization": f"Bearer {server.keys['beta']}"}) as resp:
            assert resp.status == 200, await resp.text()
    def beta_rows(d: dict) -> list[dict]:
        return [r for r in d["usage"]["rows"] if (r["tenant"], r["model"]) == ("beta", "secret")]

    deadline = time.monotonic() + 15
    while True:  # the sampler takes the request's ledger row within a second or two; totals are cached 5 s
        d = (await get(server, "/admin/dashboard.json?since=1h", ADMIN_KEY))[2]
        if (sum(d["series"]["requests"]) >= 1 and beta_rows(d)) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    secret = next(m for m in d["models"] if m["name"] == "secret")
    assert (secret["sharing"], secret["owner"]) == ("private", "beta")
    assert secret["resident"]["device"] == secret["functions"]  # in-process experts: all held here
    assert sum(n for row in secret["layers"] for n in row["hits"]) == secret["calls"] > 0
    assert any(t is not None and t > 0 for t in d["series"]["ttft_avg_s"]), d["series"]
    assert [r["requests"] for r in beta_rows(d)] == [1] and beta_rows(d)[0]["completion_tokens"] == 3
    # the page itself names no model: everything comes from the JSON, which no tenant key reads
    status, headers, html = await get(server, "/dashboard", server.keys["acme"])
    assert status == 200 and "secret" not in html and "tiny" not in html
    assert (await get(server, "/admin/dashboard.json", server.keys["beta"]))[0] == 403


@pytest.mark.asyncio(loop_scope="module")
async def test_the_page_and_its_assets_load_without_a_key_and_fetch_nothing_outside(server) -> None:
    status, headers, html = await get(server, "/dashboard", None)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        status, headers, text = await get(server, f"/dashboard/{name}", None)
        assert status == 200 and headers["Content-Type"].startswith(kind) and text
        assert "http" not in text.replace("http://www.w3.org/2000/svg", "")  # SVG's namespace is a name, not a fetch
    assert "http" not in html  # no CDN, no external font: the page works offline
    assert (await get(server, "/dashboard/../app.py", None))[0] == 404
    assert (await get(server, "/dashboard/dashboard.html.bak", None))[0] == 404


# --- headless Chromium against `faasmoe serve` -----------------------------------------------------------


class ModelSections(HTMLParser):
    """Per model section of the dumped DOM: its layer labels, its cells' tiers, its data attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[str, dict] = {}
        self._current: dict | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "section" and "model" in classes:
            self._current = self.models.setdefault(a["data-model"], {"attrs": a, "layers": [], "tiers": []})
        elif self._current is not None and "layer-label" in classes:
            self._current["layers"].append(int(a["data-layer"]))
        elif self._current is not None and "cell" in classes:
            self._current["tiers"].append(a["data-tier"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._current = None


def http_json(url: str, key: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {key}",
                                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def chromium(url: str, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    args = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=5000", *flags, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def distinct_colours(png: Path) -> dict[tuple[int, int, int], int]:
    from matplotlib import image

    pixels = (image.imread(png)[..., :3] * 255).round().astype("uint8").reshape(-1, 3)
    colours: dict[tuple[int, int, int], int] = {}
    for rgb in map(tuple, pixels[:: 7]):  # every 7th pixel is plenty to tell a page from a blank one
        colours[rgb] = colours.get(rgb, 0) + 1
    return colours


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not found: `apt-get install chromium` (.ci/run "
                                             "installs it when it can)")
def test_the_dashboard_in_headless_chromium_shows_layers_and_resident_experts(checkpoint: Path, tmp_path: Path) -> None:
    port, key = free_port(), "sk-dashboard-browser-test"
    proc = faasmoe("serve", str(checkpoint), "--port", str(port), "--workers", "1", "--device", "cpu",
                   "--expert-block-size", "2", "--keep-alive", "600", "--state", str(tmp_path / "state.db"),
                   env={"FAASMOE_API_KEY": key})
    try:
        proc.wait_for("faasmoe serving", timeout=120)
        url = f"http://127.0.0.1:{port}"
        out = http_json(url + "/v1/completions", key, {"model": "tiny", "prompt": "a few experts, please",
                                                       "max_tokens": 4, "temperature": 0})
        assert out["usage"]["completion_tokens"] == 4
        cluster = http_json(url + "/admin/cluster", key)
        resident = {f for w in cluster["workers"] for f in w["resident_functions"] if "tiny" in cluster["functions"][f]["models"]}
        assert 0 < len(resident) == cluster["models"]["tiny"]["resident_functions"], cluster

        page = f"{url}/dashboard#key={key}"  # a fragment: the key never travels in a request line or a log
        dom = chromium(page, tmp_path / "profile", "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        sections = ModelSections()
        sections.feed(dom.stdout)
        assert "tiny" in sections.models, dom.stdout[:3000]
        tiny = sections.models["tiny"]
        config = MoEConfig.from_pretrained(checkpoint)
        assert tiny["layers"] == config.moe_layers
        assert len(tiny["tiers"]) == len(config.moe_layers) * config.num_experts // 2
        assert tiny["tiers"].count("device") == len(resident) == int(tiny["attrs"]["data-resident-device"])
        assert tiny["tiers"].count("cold") == len(tiny["tiers"]) - len(resident)  # no host tier on CPU
        assert f'data-worker="{cluster["workers"][0]["id"]}"' in dom.stdout and 'id="login" hidden' in dom.stdout

        shot = tmp_path / "dashboard.png"
        taken = chromium(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,900",
                         "--hide-scrollbars")
        assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
        colours = distinct_colours(shot)
        assert len(colours) >= 8, f"the screenshot looks blank: {len(colours)} colours"
        assert colours.get(DEVICE_COLOUR, 0) >= 20, "no resident (device-coloured) cell in the screenshot"
    finally:
        assert proc.stop() == 0, proc.output
