"""The gateway's settings: one validated object built from flags and `LORAPOOL_*` variables."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from broker.keys import Limits
from gateway.validation import RequestLimits

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


def tokens(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0]
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class GatewaySettings:
    listen: str = "127.0.0.1:50051"
    redis_url: str = "redis://127.0.0.1:6379/0"
    api_tokens: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = ()
    insecure: bool = False  # allow listening beyond loopback without tokens
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate (mTLS)
    metrics_port: int = 0  # 0: no metrics endpoint
    max_message_bytes: int = 4 * 1024 * 1024
    max_upload_bytes: int = 512 * 1024 * 1024
    max_request_s: float = 600.0  # deadline of a request that brings none
    redis_timeout_s: float = 1.0
    registry_timeout_s: float = 2.0
    registry_cache_s: float = 5.0
    probe_interval_s: float = 0.5
    grace_s: float = 10.0
    keepalive_s: float = 30.0
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    queue_limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("mTLS (tls_client_ca) needs tls_cert and tls_key")
        open_access = not self.api_tokens and not self.admin_tokens
        if open_access and not self.insecure and not is_loopback(self.listen):
            raise ValueError(
                f"refusing to listen on {self.listen} without tokens: set LORAPOOL_API_TOKENS "
                "and LORAPOOL_ADMIN_TOKENS, or pass --insecure"
            )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorapool-gateway", description="The lorapool gRPC gateway")
    p.add_argument("--listen", help="host:port (LORAPOOL_LISTEN; default 127.0.0.1:50051)")
    p.add_argument("--redis-url", help="LORAPOOL_REDIS_URL")
    p.add_argument("--insecure", action="store_true", help="allow non-loopback without tokens")
    p.add_argument("--metrics-port", type=int, help="LORAPOOL_GATEWAY_METRICS_PORT (0: off)")
    p.add_argument("--tls-cert", type=Path, help="LORAPOOL_TLS_CERT")
    p.add_argument("--tls-key", type=Path, help="LORAPOOL_TLS_KEY")
    p.add_argument("--tls-client-ca", type=Path, help="LORAPOOL_TLS_CLIENT_CA (enables mTLS)")
    p.add_argument("--max-depth-per-adapter", type=int, help="LORAPOOL_MAX_DEPTH_PER_ADAPTER")
    p.add_argument("--max-depth-total", type=int, help="LORAPOOL_MAX_DEPTH_TOTAL")
    p.add_argument("--grace", type=float, help="seconds open streams get on shutdown")
    return p


def from_args(argv: list[str] | None, env: Mapping[str, str]) -> GatewaySettings:
    a = parser().parse_args(argv)

    def pick(flag: object, name: str, default: str) -> str:
        return str(flag) if flag is not None else env.get(name, default)

    limits = Limits(
        max_depth_per_adapter=int(
            pick(a.max_depth_per_adapter, "LORAPOOL_MAX_DEPTH_PER_ADAPTER", "256")
        ),
        max_depth_total=int(pick(a.max_depth_total, "LORAPOOL_MAX_DEPTH_TOTAL", "4096")),
    )

    def path(flag: Path | None, name: str) -> Path | None:
        text = flag or env.get(name)
        return Path(text) if text else None

    return GatewaySettings(
        listen=pick(a.listen, "LORAPOOL_LISTEN", "127.0.0.1:50051"),
        redis_url=pick(a.redis_url, "LORAPOOL_REDIS_URL", "redis://127.0.0.1:6379/0"),
        api_tokens=tokens(env.get("LORAPOOL_API_TOKENS")),
        admin_tokens=tokens(env.get("LORAPOOL_ADMIN_TOKENS")),
        insecure=a.insecure or env.get("LORAPOOL_INSECURE") == "1",
        metrics_port=int(pick(a.metrics_port, "LORAPOOL_GATEWAY_METRICS_PORT", "0")),
        grace_s=float(pick(a.grace, "LORAPOOL_GRACE_S", "10")),
        queue_limits=limits,
        tls_cert=path(a.tls_cert, "LORAPOOL_TLS_CERT"),
        tls_key=path(a.tls_key, "LORAPOOL_TLS_KEY"),
        tls_client_ca=path(a.tls_client_ca, "LORAPOOL_TLS_CLIENT_CA"),
    )
