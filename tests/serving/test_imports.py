"""The gateway and the client command never load torch (small images, fast start)."""

from __future__ import annotations

import subprocess
import sys


def test_gateway_and_client_do_not_import_torch() -> None:
    code = (
        "import sys, gateway.__main__, gateway.server, lorapool.cli, lorapool.client; "
        "assert 'torch' not in sys.modules and 'triton' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
