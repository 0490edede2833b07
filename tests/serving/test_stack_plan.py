"""What `lorapool serve` decides before starting anything: data dir, ports, children, banner."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from adapter_store.settings import StoreSettings, default_data_dir
from lorapool.banner import banner
from lorapool.stack import add_arguments, child_specs, metrics, plan_of, refusal


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A shell without LORAPOOL_* settings whose per-user data dir is under tmp_path."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    monkeypatch.delenv("LORAPOOL_DATA_DIR", raising=False)
    return {"XDG_DATA_HOME": str(tmp_path / "share"), "LORAPOOL_BASE_MODEL_DIR": "/model"}


def test_serve_uses_the_data_dir_every_entry_point_uses(
    env: dict[str, str], tmp_path: Path
) -> None:
    plan = plan_of(args(), env)
    assert plan.data_dir == default_data_dir(env) == tmp_path / "share" / "lorapool"
    # The admin CLI, the gateway and the workers build StoreSettings from this environment.
    assert StoreSettings.from_env(env).database_url == StoreSettings.from_env(plan.env).database_url
    assert plan.env["LORAPOOL_DATA_DIR"] == str(plan.data_dir)
    assert plan_of(args("--data-dir", str(tmp_path / "x")), env).env["LORAPOOL_DATA_DIR"] == str(
        tmp_path / "x"
    )


def test_children_table_ports_and_stop_order(env: dict[str, str]) -> None:
    plan = plan_of(args("--workers", "2"), env)
    ports = [plan.redis_port, plan.gateway_metrics_port, *plan.worker_metrics_ports]
    assert len(set(ports)) == 4 and None not in ports
    assert plan.env["LORAPOOL_REDIS_URL"] == f"redis://127.0.0.1:{plan.redis_port}/0"
    specs = child_specs(plan)
    assert [s.name for s in specs] == ["redis", "gateway", "worker-1", "worker-2"]
    gateway, w1, w2 = specs[1:]
    assert gateway.argv[-2:] == ["--metrics-port", str(plan.gateway_metrics_port)]
    assert [w1.argv[-1], w2.argv[-1]] == [str(p) for p in plan.worker_metrics_ports]
    assert str(plan.redis_port) in specs[0].argv and "appendonly" in " ".join(specs[0].argv)
    assert w1.stop_timeout_s > 30  # longer than a worker's drain


def test_metrics_ports_from_the_environment(env: dict[str, str]) -> None:
    env |= {
        "LORAPOOL_GATEWAY_METRICS_PORT": "9100",
        "LORAPOOL_WORKER_METRICS_PORT": "9200",
        "LORAPOOL_REDIS_URL": "redis://elsewhere:6379/0",
    }
    plan = plan_of(args("--workers", "2"), env)
    assert plan.redis_port is None and [s.name for s in child_specs(plan)][0] == "gateway"
    assert metrics(plan) == {"gateway": 9100, "worker-1": 9200, "worker-2": 9201}
    plan = plan_of(args("--gateway-metrics-port", "9300", "--worker-metrics-port", "9400"), env)
    assert metrics(plan) == {"gateway": 9300, "worker-1": 9400}


def test_banner_points_at_metrics_and_tokens_without_printing_them(
    env: dict[str, str], tmp_path: Path
) -> None:
    plan = plan_of(args(), env)
    text = banner("127.0.0.1:50051", plan.data_dir, plan.env, metrics(plan), env)
    assert f"http://127.0.0.1:{plan.gateway_metrics_port}/metrics" in text
    assert f"worker-1 http://127.0.0.1:{plan.worker_metrics_ports[0]}/metrics" in text
    assert "--token" not in text and "--data-dir" not in text
    secret = {"LORAPOOL_API_TOKENS": "s3cret-api", "LORAPOOL_ADMIN_TOKENS": "s3cret-admin"}
    other_dir = tmp_path / "elsewhere"
    text = banner("0.0.0.0:50051", other_dir, plan.env | secret, metrics(plan), env)
    assert "s3cret" not in text
    assert 'lorapool generate --target 127.0.0.1:50051 --token "$LORAPOOL_API_TOKEN"' in text
    assert '--target 127.0.0.1:50051 --token "$LORAPOOL_ADMIN_TOKEN" list' in text
    assert f"lorapool-admin --data-dir {other_dir} list" in text


@pytest.mark.parametrize(
    ("listen", "extra", "flags", "refused"),
    [
        ("127.0.0.1:50051", {}, [], False),
        ("0.0.0.0:50051", {}, [], True),
        ("0.0.0.0:50051", {"LORAPOOL_ADMIN_TOKENS": "a"}, [], True),  # Generate would be open
        ("0.0.0.0:50051", {"LORAPOOL_API_TOKENS": "t"}, [], False),
        ("0.0.0.0:50051", {}, ["--insecure"], False),
    ],
)
def test_refusal_beyond_loopback_without_api_tokens(
    listen: str, extra: dict[str, str], flags: list[str], refused: bool
) -> None:
    assert (refusal(args("--listen", listen, *flags), extra) is not None) is refused
