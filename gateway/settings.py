"""The gateway's settings: one validated object built from flags and `LORAPOOL_*` variables."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from broker.keys import Limits
from gateway.unpack import UploadLimits
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


def exposure_refusal(listen: str, api_tokens: tuple[str, ...], insecure: bool) -> str | None:
    """Why a gateway must not listen on `listen`, or None when it may.

    Beyond loopback, Generate must be behind API tokens: admin tokens alone leave it open
    to anyone. `insecure` overrides.
    """
    if api_tokens or insecure or is_loopback(listen):
        return None
    return (
        f"refusing to listen on {listen} without API tokens (Generate would be open to "
        "anyone): set LORAPOOL_API_TOKENS, or pass --insecure"
    )


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
    metrics_addr: str = "0.0.0.0"  # noqa: S104 (the compose network; serve sets loopback)
    max_message_bytes: int = 4 * 1024 * 1024
    max_request_s: float = 600.0  # deadline of a request that brings none
    no_worker_grace_s: float = 15.0  # no live worker this long: Generate answers UNAVAILABLE
    top_adapters: int = 50  # adapters with their own metric label; the rest are `other`
    registry_threads: int = 4  # threads for registry calls (a stalled DB holds at most these)
    registry_max_pending: int = 32  # registry calls running or queued; past it: UNAVAILABLE
    redis_timeout_s: float = 1.0
    registry_timeout_s: float = 2.0
    registry_cache_s: float = 5.0
    probe_interval_s: float = 0.5
    grace_s: float = 10.0
    keepalive_s: float = 30.0
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    queue_limits: Limits = field(default_factory=Limits)
    upload_limits: UploadLimits = field(default_factory=UploadLimits)

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("mTLS (tls_client_ca) needs tls_cert and tls_key")
        refusal = exposure_refusal(self.listen, self.api_tokens, self.insecure)
        if refusal is not None:
            raise ValueError(refusal)
        if self.no_worker_grace_s < 0 or self.top_adapters < 0:
            raise ValueError("no_worker_grace_s and top_adapters must be >= 0")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorapool-gateway", description="The lorapool gRPC gateway")
    p.add_argument("--listen", help="host:port (LORAPOOL_LISTEN; default 127.0.0.1:50051)")
    p.add_argument("--redis-url", help="LORAPOOL_REDIS_URL")
    p.add_argument("--insecure", action="store_true", help="allow non-loopback without tokens")
    p.add_argument("--metrics-port", type=int, help="LORAPOOL_GATEWAY_METRICS_PORT (0: off)")
    p.add_argument("--metrics-addr", help="LORAPOOL_METRICS_ADDR (default 0.0.0.0)")
    p.add_argument(
        "--registry-timeout", type=float, help="LORAPOOL_REGISTRY_TIMEOUT_S: registry calls (2)"
    )
    p.add_argument("--tls-cert", type=Path, help="LORAPOOL_TLS_CERT")
    p.add_argument("--tls-key", type=Path, help="LORAPOOL_TLS_KEY")
    p.add_argument("--tls-client-ca", type=Path, help="LORAPOOL_TLS_CLIENT_CA (enables mTLS)")
    p.add_argument("--max-depth-per-adapter", type=int, help="LORAPOOL_MAX_DEPTH_PER_ADAPTER")
    p.add_argument("--max-depth-total", type=int, help="LORAPOOL_MAX_DEPTH_TOTAL")
    p.add_argument("--grace", type=float, help="seconds open streams get on shutdown")
    p.add_argument("--no-worker-grace", type=float, help="LORAPOOL_NO_WORKER_GRACE_S (15)")
    p.add_argument("--top-adapters", type=int, help="LORAPOOL_METRICS_TOP_ADAPTERS (50)")
    p.add_argument("--max-upload-bytes", type=int, help="LORAPOOL_MAX_UPLOAD_BYTES (512 MiB)")
    p.add_argument("--max-extracted-bytes", type=int, help="LORAPOOL_MAX_EXTRACTED_BYTES (2 GiB)")
    p.add_argument("--max-upload-files", type=int, help="LORAPOOL_MAX_UPLOAD_FILES (64)")
    p.add_argument("--upload-dir", type=Path, help="LORAPOOL_UPLOAD_DIR (system temp dir)")
    p.add_argument("--registry-threads", type=int, help="LORAPOOL_REGISTRY_THREADS (4)")
    p.add_argument("--registry-max-pending", type=int, help="LORAPOOL_REGISTRY_MAX_PENDING (32)")
    return p


@dataclass(frozen=True)
class _Source:
    """A flag if given, else the environment variable, else the default."""

    args: argparse.Namespace
    env: Mapping[str, str]

    def get(self, flag: str, name: str, default: object) -> str:
        value = getattr(self.args, flag)
        return str(value) if value is not None else self.env.get(name, str(default))

    def path(self, flag: str, name: str) -> Path | None:
        text = getattr(self.args, flag) or self.env.get(name)
        return Path(text) if text else None


def _upload_limits(src: _Source) -> UploadLimits:
    u = UploadLimits()
    return UploadLimits(
        max_upload_bytes=int(
            src.get("max_upload_bytes", "LORAPOOL_MAX_UPLOAD_BYTES", u.max_upload_bytes)
        ),
        max_extracted_bytes=int(
            src.get("max_extracted_bytes", "LORAPOOL_MAX_EXTRACTED_BYTES", u.max_extracted_bytes)
        ),
        max_files=int(src.get("max_upload_files", "LORAPOOL_MAX_UPLOAD_FILES", u.max_files)),
        directory=src.path("upload_dir", "LORAPOOL_UPLOAD_DIR"),
    )


def from_args(argv: list[str] | None, env: Mapping[str, str]) -> GatewaySettings:
    a = parser().parse_args(argv)
    src, d = _Source(a, env), GatewaySettings()
    limits = Limits(
        max_depth_per_adapter=int(
            src.get("max_depth_per_adapter", "LORAPOOL_MAX_DEPTH_PER_ADAPTER", 256)
        ),
        max_depth_total=int(src.get("max_depth_total", "LORAPOOL_MAX_DEPTH_TOTAL", 4096)),
    )
    return GatewaySettings(
        listen=src.get("listen", "LORAPOOL_LISTEN", d.listen),
        redis_url=src.get("redis_url", "LORAPOOL_REDIS_URL", d.redis_url),
        api_tokens=tokens(env.get("LORAPOOL_API_TOKENS")),
        admin_tokens=tokens(env.get("LORAPOOL_ADMIN_TOKENS")),
        insecure=a.insecure or env.get("LORAPOOL_INSECURE") == "1",
        metrics_port=int(src.get("metrics_port", "LORAPOOL_GATEWAY_METRICS_PORT", 0)),
        metrics_addr=str(src.get("metrics_addr", "LORAPOOL_METRICS_ADDR", "0.0.0.0")),  # noqa: S104
        registry_timeout_s=float(src.get("registry_timeout", "LORAPOOL_REGISTRY_TIMEOUT_S", 2.0)),
        grace_s=float(src.get("grace", "LORAPOOL_GRACE_S", d.grace_s)),
        no_worker_grace_s=float(
            src.get("no_worker_grace", "LORAPOOL_NO_WORKER_GRACE_S", d.no_worker_grace_s)
        ),
        top_adapters=int(src.get("top_adapters", "LORAPOOL_METRICS_TOP_ADAPTERS", 50)),
        registry_threads=int(src.get("registry_threads", "LORAPOOL_REGISTRY_THREADS", 4)),
        registry_max_pending=int(
            src.get("registry_max_pending", "LORAPOOL_REGISTRY_MAX_PENDING", 32)
        ),
        queue_limits=limits,
        upload_limits=_upload_limits(src),
        tls_cert=src.path("tls_cert", "LORAPOOL_TLS_CERT"),
        tls_key=src.path("tls_key", "LORAPOOL_TLS_KEY"),
        tls_client_ca=src.path("tls_client_ca", "LORAPOOL_TLS_CLIENT_CA"),
    )
