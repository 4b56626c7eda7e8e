"""The demo stays apart from real use (issue 9 item 6): its own pools, Secret block and endpoint, set on
the demo deployments only (prefect.yaml), and a Vast.ai key is refused, before any request, at an
endpoint it does not belong to. Fast: no server, no emulator."""
from __future__ import annotations

import re

import pytest

from devtools.deployments import deployment, deployment_env
from devtools.services import REPO
from devtools.stack import DEMO_DEPLOYMENTS, LocalStack
from infra.backends.vast.credentials import endpoint_url, secret_block_name
from tasks import secrets
from vast_keys import EMU_KEY, REAL_LOOKING_KEY, use_env

REAL_DEPLOYMENTS = ("qat/int8", "qat/int4", "reap/reap")


@pytest.mark.parametrize("url", [None, "https://console.vast.ai"])
def test_the_real_endpoint_refuses_an_emulator_key(url):
    with pytest.raises(secrets.VastCredentialsRefused, match="emulator's API key.*vast-api-key"):
        secrets.check_vast_credentials(EMU_KEY, url)
    secrets.check_vast_credentials(REAL_LOOKING_KEY, url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8765", "http://localhost:9999"])
def test_an_emulator_endpoint_refuses_a_real_looking_key(url):
    with pytest.raises(secrets.VastCredentialsRefused, match="looks like a real Vast.ai API key"):
        secrets.check_vast_credentials(REAL_LOOKING_KEY, url)
    for key in (EMU_KEY, "test-emulator-key", "vastkey-chaos-0000"):  # what the demo, tests and chaos use
        secrets.check_vast_credentials(key, url)


def test_a_real_run_with_the_demo_key_left_in_vast_api_key_is_refused_before_any_request(monkeypatch, no_network):
    """An older demo saved its emulator key as `vast-api-key`: the real deployment's estimate (its first
    Vast.ai call) refuses it, names the block and says what to do, and opens no connection."""
    from contract.config import load_config
    from tasks.rental import estimate_cost

    use_env(monkeypatch, deployment_env("qat/int8"))
    monkeypatch.setattr(secrets, "_secret_block", lambda name: EMU_KEY if name == "vast-api-key" else None)
    with pytest.raises(secrets.VastCredentialsRefused) as e:
        estimate_cost.fn(load_config("int8"))
    assert "Secret block 'vast-api-key'" in str(e.value) and "save('vast-api-key'" in str(e.value)
    assert EMU_KEY not in str(e.value)
    assert no_network == []


def test_the_demo_deployment_with_a_real_key_in_the_worker_env_is_refused_before_any_request(monkeypatch, no_network):
    from contract.config import load_config
    from tasks.rental import estimate_cost

    use_env(monkeypatch, {**deployment_env("qat/demo"), "VAST_API_KEY": REAL_LOOKING_KEY})
    with pytest.raises(secrets.VastCredentialsRefused, match="VAST_API_KEY") as e:
        estimate_cost.fn(load_config("demo"))
    assert REAL_LOOKING_KEY not in str(e.value)
    assert no_network == []


def test_a_refused_key_is_still_redacted(monkeypatch):
    use_env(monkeypatch, {"VAST_API_KEY": EMU_KEY})
    assert secrets.redact(f"boom {EMU_KEY}") == "boom ***"


def test_demo_and_real_deployments_differ_in_pool_endpoint_and_secret(monkeypatch):
    """Read through the product's own lookups, under each deployment's job variables."""
    seen = {}
    for name in REAL_DEPLOYMENTS + DEMO_DEPLOYMENTS:
        use_env(monkeypatch, deployment_env(name))
        seen[name] = (deployment(name)["work_pool"]["name"], endpoint_url(), secret_block_name())
    for name in REAL_DEPLOYMENTS:
        pool, url, block = seen[name]
        assert secrets.is_real_endpoint(url) and url is None and block == secrets.VAST_SECRET_BLOCK, seen[name]
    real_pools = {seen[n][0] for n in REAL_DEPLOYMENTS}
    for name in DEMO_DEPLOYMENTS:
        pool, url, block = seen[name]
        assert not secrets.is_real_endpoint(url) and block == secrets.DEMO_VAST_SECRET_BLOCK, seen[name]
        assert pool not in real_pools, seen[name]
    assert seen["qat/demo"][0] != seen["reap/demo"][0]  # the demo's reaper has its own worker too


def test_the_local_stack_serves_only_the_demo_and_carries_no_vast_settings(monkeypatch):
    monkeypatch.setenv("VAST_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("VAST_API_KEY", REAL_LOOKING_KEY)
    stack = LocalStack()
    demo = deployment_env("qat/demo")
    assert stack.vast_url == demo["VAST_URL"] and stack.secret_block == demo["VAST_API_KEY_BLOCK"]
    assert set(stack.pools.values()) == {deployment(n)["work_pool"]["name"] for n in DEMO_DEPLOYMENTS}
    assert not {k for k in {**stack.env(), **stack.service_env()} if k.startswith("VAST_")}
    demo_sh = (REPO / "scripts/demo.sh").read_text()
    assert re.findall(r"--name (\S+)", demo_sh) == list(DEMO_DEPLOYMENTS)
