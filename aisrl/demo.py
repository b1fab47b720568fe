"""`aisrl demo --diagnostics-only`: the diagnostics service on generated batches, end to end through its real APIs.

Invariant: everything it starts (embedded Redis, gRPC and HTTP servers) is stopped before it
returns, also on Ctrl-C. Batches are synthetic (FP8-like logprob noise that grows over the
steps), so the demo shows how alpha follows the mismatch; it does not train a model.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import httpx
from rich.console import Console
from rich.table import Table

from aisrl.core.synthetic import synthetic_batch
from aisrl.core.types import CorrectionConfig
from aisrl.redis_conn import start_embedded_redis
from aisrl.services.diagnostics.config import DiagnosticsSettings
from aisrl.services.diagnostics.dashboard import render_dashboard
from aisrl.services.diagnostics.main import start_diagnostics
from aisrl.v1 import diagnostics_pb2_grpc
from aisrl.wire.coefficient import batch_to_pb

RUN_ID = "demo"


def _mismatch_at(step: int, steps: int) -> float:
    """Logprob noise that starts near BF16 agreement and grows to a strong FP8-like mismatch."""
    return 0.005 + 0.3 * (step / max(1, steps - 1)) ** 2


async def _demo(steps: int, keep_serving: bool, console: Console, out_dir: Path) -> None:
    with start_embedded_redis() as redis_server:
        settings = DiagnosticsSettings(http_port=0, grpc_port=0, redis_url=redis_server.url)
        running = await start_diagnostics(settings, redis_server.url)
        try:
            console.print(f"[bold]diagnostics[/] REST {running.http_url} (docs: {running.http_url}/docs)  "
                          f"gRPC {running.grpc_target}")  # fmt: skip
            config = CorrectionConfig()
            table = Table(title=f"AIS on {steps} synthetic batches (mode={config.mode.value}, cap={config.cap})")
            for column in ("step", "noise", "tokens", "alpha", "rho", "s", "p", "kl", "warnings"):
                table.add_column(column, justify="right")
            async with grpc.aio.insecure_channel(running.grpc_target) as channel:
                stub = diagnostics_pb2_grpc.DiagnosticsStub(channel)
                for step in range(steps):
                    noise = _mismatch_at(step, steps)
                    arrays = synthetic_batch(n_sequences=64, mean_length=48, mismatch=noise, seed=step)
                    result = await stub.ComputeCoefficient(
                        batch_to_pb(arrays, config, run_id=RUN_ID, step=step), timeout=10
                    )
                    table.add_row(
                        str(step), f"{noise:.3f}", str(result.n_tokens), f"{result.alpha:.3f}",
                        f"{result.applied.reliability:.3f}", f"{result.severity:.3f}", f"{result.applied.penalty:.3f}",
                        f"{result.kl:.2e}", str(len(result.warnings)),
                    )  # fmt: skip
            console.print(table)
            async with httpx.AsyncClient(base_url=running.http_url, timeout=10) as http:
                latest = (await http.get(f"/v1/runs/{RUN_ID}/coefficient")).json()
                series = (await http.get(f"/v1/runs/{RUN_ID}/series")).json()
            page = render_dashboard([RUN_ID], snapshot=[series])  # a file that opens without the service
            out_dir.mkdir(parents=True, exist_ok=True)
            dashboard = out_dir / "dashboard.html"
            dashboard.write_text(page)
            console.print(f"latest (REST): alpha={latest['alpha']:.3f} rho={latest['reliability']:.3f} "
                          f"s={latest['severity']:.3f} p={latest['penalty']:.3f} kl={latest['kl']:.2e}")  # fmt: skip
            if latest["warnings"]:
                console.print("health warnings: " + "; ".join(latest["warnings"]))
            console.print(f"dashboard saved to {dashboard}")
            if keep_serving:
                console.print(f"dashboard live at {running.http_url}/v1/runs/{RUN_ID}/dashboard (Ctrl-C to stop)")
                with contextlib.suppress(asyncio.CancelledError):
                    await running.task
        finally:
            await running.stop()


def run_demo(steps: int = 20, keep_serving: bool = False, out_dir: Path = Path("runs/demo")) -> None:
    console = Console()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_demo(steps, keep_serving, console, out_dir))
