"""What `lorapool serve` prints once it serves: where things are and what to type next.

Tokens are never printed: when the stack has API (admin) tokens, the suggested commands
read them from `$LORAPOOL_API_TOKEN` (`$LORAPOOL_ADMIN_TOKEN`), which the user sets to one
of the tokens the stack was given.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

from adapter_store.settings import default_data_dir
from gateway.settings import tokens

WILDCARD_HOSTS = ("0.0.0.0", "[::]", "::", "")


def local_target(listen: str) -> str:
    """The address a client on this host dials for `listen` (wildcards become loopback)."""
    host, _, port = listen.rpartition(":")
    return f"127.0.0.1:{port}" if host in WILDCARD_HOSTS else listen


def banner(
    listen: str,
    data_dir: Path,
    env: Mapping[str, str],
    metrics: Mapping[str, int],
    shell_env: Mapping[str, str],
) -> str:
    """`env`: the stack's settings; `shell_env`: the caller's (decides whether the admin
    command needs --data-dir to find the same registry)."""
    target = local_target(listen)
    api = ' --token "$LORAPOOL_API_TOKEN"' if tokens(env.get("LORAPOOL_API_TOKENS")) else ""
    admin = ' --token "$LORAPOOL_ADMIN_TOKEN"' if tokens(env.get("LORAPOOL_ADMIN_TOKENS")) else ""
    same_dir = data_dir == default_data_dir(shell_env)
    local_flag = "" if same_dir else f" --data-dir {shlex.quote(str(data_dir))}"
    lines = [
        "",
        f"lorapool is serving on {listen} (Redis {env.get('LORAPOOL_REDIS_URL')}, "
        f"data in {data_dir}).",
        "Metrics: " + ", ".join(f"{n} http://127.0.0.1:{p}/metrics" for n, p in metrics.items()),
        f'Try:    lorapool generate --target {target}{api} --adapter upper "Name three colors."',
        f"Admin:  lorapool-admin{local_flag} list    "
        f"(through the gateway: lorapool-admin --target {target}{admin} list)",
    ]
    if api or admin:
        lines.append(
            "        Set LORAPOOL_API_TOKEN / LORAPOOL_ADMIN_TOKEN to one of this stack's "
            "tokens (they are not printed here)."
        )
    lines += ["Stop with Ctrl-C.", "", ""]
    return "\n".join(lines)
