"""The Vast.ai key goes to exactly https://console.vast.ai, checked before any request by the flow
and by the reaper CLI (issue 19 finding 15). Fast: no server, no emulator."""
from __future__ import annotations

import pytest

from infra import reaper
from tasks.secrets import VastCredentialsRefused, check_vast_credentials, is_real_endpoint
from vast_keys import EMU_KEY, REAL_LOOKING_KEY, use_env

NOT_THE_CONSOLE = ["http://console.vast.ai", "https://console.vast.ai:8080", "http://console.vast.ai:443",
                   "https://user@console.vast.ai", "https://console.vast.ai/api/v0?x=1", "ftp://console.vast.ai"]


@pytest.mark.parametrize("url", [None, "https://console.vast.ai", "https://console.vast.ai/",
                                 "https://console.vast.ai:443", "HTTPS://Console.Vast.AI"])
def test_the_console_is_exactly_https_on_port_443(url):
    assert is_real_endpoint(url)
    check_vast_credentials(REAL_LOOKING_KEY, url)


@pytest.mark.parametrize("url", NOT_THE_CONSOLE)
def test_the_console_host_in_plain_http_or_on_another_port_gets_no_key(url):
    assert not is_real_endpoint(url)
    for key in (REAL_LOOKING_KEY, EMU_KEY):
        with pytest.raises(VastCredentialsRefused, match="only as https://console.vast.ai.*VAST_URL unset"):
            check_vast_credentials(key, url, "the environment variable VAST_API_KEY")


@pytest.mark.parametrize("url", ["http://console.vast.ai", "http://127.0.0.1:8765"])
def test_the_reaper_cli_checks_the_key_against_its_endpoint_before_any_request(url, monkeypatch, capsys, no_network):
    use_env(monkeypatch, {"VAST_API_KEY": REAL_LOOKING_KEY})
    assert reaper.main(["--max-age-hours", "24", "--dry-run", "--url", url]) == 2
    err = capsys.readouterr().err
    assert "refusing to send" in err and REAL_LOOKING_KEY not in err
    assert no_network == []
