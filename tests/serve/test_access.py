"""Who may reach what: the admin key, admin paths that must stay inside the allowed roots, path and Host
header tricks, a dead engine. A real server process (or uvicorn in this process where the test needs the
engine), raw HTTP."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx2 as httpx

from tests.serve.conftest import ADMIN_KEY, API_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def load(url: str, name: str, path: str, headers: dict[str, str] = ADMIN) -> httpx.Response:
    return httpx.post(f"{url}/admin/adapters", json={"name": name, "path": path}, headers=headers, timeout=60)


# -- 8. admin -------------------------------------------------------------------------------------------------
def test_admin_needs_the_admin_key_not_the_api_key(server: str, lora_runs: dict[str, Path]) -> None:
    assert load(server, "gamma", str(lora_runs["gamma"]), AUTH).status_code == 401
    assert httpx.delete(f"{server}/admin/adapters/alpha", headers=AUTH).status_code == 401
    assert httpx.get(f"{server}/v1/models", headers=ADMIN).status_code == 401  # and it is no API key either


def test_without_an_admin_key_there_is_no_admin(live_server, lora_runs: dict[str, Path]) -> None:
    url, _ = live_server(allow_roots=[lora_runs["gamma"].parent])
    r = load(url, "gamma", str(lora_runs["gamma"]), {})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.delete(f"{url}/admin/adapters/alpha").status_code == 404


def test_admin_refuses_hostile_names_and_paths(server: str, lora_runs: dict[str, Path], tmp_path: Path) -> None:
    gamma = str(lora_runs["gamma"])
    r = load(server, "gamma\n", gamma)
    assert r.status_code == 400 and "adapter name" in r.json()["error"]["message"]
    for path in [gamma + "\x00/x", gamma + "/" + "a" * 300, "/" + "a/" * 3000]:
        r = load(server, "evil", path)
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", (path[:40], r.text[:200])
        assert r.json()["error"]["type"] == "invalid_request_error"
    # A run folder inside the allowed root whose adapter/ links outside it.
    outside = tmp_path / "outside-adapter"
    shutil.copytree(lora_runs["gamma"] / "adapter", outside)
    linked = lora_runs["gamma"].parent / "linked"
    linked.mkdir()
    shutil.copy(lora_runs["gamma"] / "config.yaml", linked / "config.yaml")
    (linked / "adapter").symlink_to(outside)
    r = load(server, "linked", str(linked))
    assert r.status_code == 403 and "outside the allowed roots" in r.json()["error"]["message"]
    # ... or whose adapter's weights file does.
    weights = next(lora_runs["gamma"].glob("adapter/adapter_model.*")).name
    (linked / "adapter").unlink()
    shutil.copytree(outside, linked / "adapter")
    (linked / "adapter" / weights).unlink()
    (linked / "adapter" / weights).symlink_to(outside / weights)
    r = load(server, "linked", str(linked))
    assert r.status_code == 403 and "outside the allowed roots" in r.json()["error"]["message"]
    r = load(server, "reg", "models:/someone-elses@champion")
    assert r.status_code == 403 and "--allow-root models:/someone-elses" in r.json()["error"]["message"]


# -- 9. liveness and routed paths -----------------------------------------------------------------------------
def test_health_is_503_when_the_engine_worker_is_dead(live_server) -> None:
    url, engine = live_server()
    assert httpx.get(f"{url}/health").status_code == 200
    engine.shutdown()
    engine._worker.join(timeout=10)
    r = httpx.get(f"{url}/health")
    assert r.status_code == 503 and r.json()["status"] == "engine stopped"


def test_auth_cannot_be_bypassed_with_path_or_host_tricks(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    with httpx.Client() as h:
        # Starlette rebuilds the URL from the Host header: this makes its path /health, an open path.
        r = h.get(f"{server}/v1/models", headers={"Host": f"127.0.0.1:{port}/health?"})
        assert r.status_code == 401, r.text
        for path in ["//v1/models", "/v1/models/", "/v1//models", "/./v1/models", "/health/../v1/models",
                     "/%761/models", "/v1/models%2F", "/v1/models?x=/health"]:
            r = h.get(f"{server}{path}", follow_redirects=True)
            assert r.status_code in (401, 404), (path, r.status_code)


# -- 10. keyless loopback: DNS rebinding and simple cross-site posts ------------------------------------------
def test_keyless_loopback_checks_host_and_content_type(live_server) -> None:
    url, _ = live_server()
    port = url.rsplit(":", 1)[1]
    body = {"model": "alpha", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    for host in [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"]:
        assert httpx.get(f"{url}/v1/models", headers={"Host": host}).status_code == 200, host
    for host in [f"evil.example:{port}", "127.0.0.1:1", "localhost"]:
        r = httpx.get(f"{url}/v1/models", headers={"Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host", host
    r = httpx.post(f"{url}/v1/chat/completions", content=httpx.Request("POST", url, json=body).content,
                   headers={"Content-Type": "text/plain"})  # what a cross-site form may send without a preflight
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
