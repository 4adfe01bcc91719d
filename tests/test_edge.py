"""Edge-proxy concerns: the client's address behind trusted proxies, request ids from the balancer,
HTTPS with a certificate and key, and HTTP/2 to clients (over TLS by ALPN, and cleartext h2c)."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.forwarded import ClientAddress, request_id
from proxy.settings import ConfigError, parse_settings
from tests.conftest import KEY

AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


# -- X-Forwarded-For, read only from trusted proxies ---------------------------------------------


@pytest.mark.parametrize("trusted,peer,forwarded,client", [
    ([], "10.0.0.5", "203.0.113.9", "10.0.0.5"),  # no trusted proxy: the header is never read
    (["10.0.0.0/8"], "192.0.2.1", "203.0.113.9", "192.0.2.1"),  # from an untrusted peer: ignored
    (["10.0.0.0/8"], "10.0.0.5", "203.0.113.9", "203.0.113.9"),
    (["10.0.0.0/8"], "10.0.0.5", None, "10.0.0.5"),
    # the client wrote a fake address itself: the proxy appended the real one, and that is read
    (["10.0.0.0/8"], "10.0.0.5", "1.1.1.1, 203.0.113.9", "203.0.113.9"),
    # two trusted hops: the first untrusted address from the right
    (["10.0.0.0/8", "172.16.0.0/12"], "10.0.0.5", "1.1.1.1, 203.0.113.9, 172.16.0.2", "203.0.113.9"),
    (["10.0.0.0/8"], "10.0.0.5", "10.0.0.7, 10.0.0.6", "10.0.0.7"),  # every hop trusted: the leftmost
    (["10.0.0.0/8"], "10.0.0.5", "203.0.113.9, garbage", "10.0.0.5"),  # garbled: the last vouched-for
    (["10.0.0.0/8"], "::ffff:10.0.0.5", "2001:db8::1", "2001:db8::1"),  # IPv4-mapped peer
    (["::1"], "::1", " 198.51.100.4 ", "198.51.100.4"),
])
def test_client_address(trusted: list[str], peer: str, forwarded: str | None, client: str) -> None:
    headers = {"x-forwarded-for": forwarded} if forwarded is not None else {}
    assert ClientAddress(trusted).of(peer, headers) == client


@pytest.mark.parametrize("sent,kept", [
    ("lb-7f3a9c", True), ("3f2b8c1e-9d4a-4e2f-8a6b-1c2d3e4f5a6b", True), ("a" * 128, True),
    ("a" * 129, False), ("two words", False), ("x\r\nSet-Cookie: a=b", False), ("", False), ("é", False),
])
def test_request_id_is_kept_only_when_safe_to_log_and_echo(sent: str, kept: bool) -> None:
    assert request_id({"x-request-id": sent}) == (sent if kept else None)


def test_the_log_names_the_client_behind_a_trusted_proxy_and_the_balancers_request_id(start_gateway, mock):
    gw = start_gateway(server={"max_body_bytes": 65536, "trusted_proxies": ["127.0.0.1"]})
    reply = httpx.post(f"{gw.url}/api/chat/completions", json=BODY, timeout=10, headers={
        **AUTH, "X-Forwarded-For": "6.6.6.6, 203.0.113.9", "X-Request-Id": "lb-req-42"})
    assert reply.status_code == 200
    assert reply.headers["x-respan-gateway-request-id"] == "lb-req-42"
    record = gw.record(reply.headers["x-respan-log-id"])
    assert record["ip_address"] == "203.0.113.9"
    assert record["gateway_request_id"] == "lb-req-42"
    unsafe = httpx.post(f"{gw.url}/api/chat/completions", json=BODY, headers={**AUTH, "X-Request-Id": "a b"},
                        timeout=10)
    assert unsafe.headers["x-respan-gateway-request-id"] not in ("a b", "lb-req-42")  # a fresh one


def test_forwarded_for_is_ignored_from_a_peer_that_is_not_trusted(start_gateway, mock):
    gw = start_gateway(server={"max_body_bytes": 65536, "trusted_proxies": ["10.0.0.0/8"]})
    reply = httpx.post(f"{gw.url}/api/chat/completions", json=BODY, timeout=10,
                       headers={**AUTH, "X-Forwarded-For": "203.0.113.9"})
    assert gw.record(reply.headers["x-respan-log-id"])["ip_address"] == "127.0.0.1"


# -- HTTPS and HTTP/2 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (Debian's openssl)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def tls_server(cert: Path, key: Path, **server: Any) -> dict[str, Any]:
    return {"max_body_bytes": 65536, "tls_cert": str(cert), "tls_key": str(key), **server}


def test_https_with_http2_negotiated_and_the_openai_sdk(start_gateway, mock, certificate):
    cert, key = certificate
    gw = start_gateway(server=tls_server(cert, key))
    assert gw.url.startswith("https://")
    trust = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(verify=trust, http2=True, timeout=10) as client:
        reply = client.post(f"{gw.url}/api/chat/completions", json=BODY, headers=AUTH)
        assert reply.status_code == 200 and reply.http_version == "HTTP/2"
        assert reply.json()["choices"][0]["message"]["content"]
        with client.stream("POST", f"{gw.url}/api/chat/completions", json={**BODY, "stream": True},
                           headers=AUTH) as streamed:
            assert streamed.http_version == "HTTP/2"
            assert "data: [DONE]" in list(streamed.iter_lines())
    with httpx.Client(verify=trust, timeout=10) as client:  # HTTP/1.1 clients are served too
        assert client.get(f"{gw.url}/api/health-check/").http_version == "HTTP/1.1"
    sdk = openai.OpenAI(base_url=f"{gw.url}/api", api_key=KEY, http_client=httpx.Client(verify=trust))
    assert sdk.chat.completions.create(**BODY).choices[0].message.content
    with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on the TLS port
        httpx.get(f"http://127.0.0.1:{gw.port}/api/health-check/", timeout=2)


def test_cleartext_http2_with_prior_knowledge_unless_http1_only(start_gateway, mock):
    gw = start_gateway(server={"max_body_bytes": 65536})  # http: auto
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        reply = client.post(f"{gw.url}/api/chat/completions", json=BODY, headers=AUTH)
    assert reply.status_code == 200 and reply.http_version == "HTTP/2"
    only_1 = start_gateway(server={"max_body_bytes": 65536, "http": "1"})
    with httpx.Client(http1=False, http2=True, timeout=5) as client, pytest.raises(httpx.HTTPError):
        client.post(f"{only_1.url}/api/chat/completions", json=BODY, headers=AUTH)
    assert httpx.post(f"{only_1.url}/api/chat/completions", json=BODY, headers=AUTH, timeout=10).status_code == 200


@pytest.mark.parametrize("server,message", [
    ({"tls_cert": "cert.pem"}, "$.server.tls_key: HTTPS needs both tls_cert and tls_key"),
    ({"tls_key": "key.pem"}, "$.server.tls_cert: HTTPS needs both tls_cert and tls_key"),
    ({"tls_cert": "/nonexistent/cert.pem", "tls_key": "/nonexistent/key.pem"},
     "$.server.tls_cert: cannot read '/nonexistent/cert.pem'"),
    ({"trusted_proxies": ["10.0.0.0/8", "lb.internal"]},
     "$.server.trusted_proxies: 'lb.internal' is not an IP address or network (CIDR)"),
    ({"http": "2"}, "$.server.http"),
])
def test_edge_settings_errors_name_the_field(server: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings({"server": server}, "edge.yaml")
    assert message in str(error.value)
