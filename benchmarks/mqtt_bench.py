"""The MQTT transport against gRPC in one run: digits round latency with 10 node
processes, and the whole fit phase of a 100 MB model with 10 nodes (every node downloads
the model and uploads its update through mosquitto), server memory included.

    python benchmarks/mqtt_bench.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import report
from fleet_bench import BIG_ELEMENTS, MB, bench_big, bench_digits


def main() -> None:
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    for transport in ("grpc", "mqtt"):
        digits = bench_digits(transport)
        big = bench_big(10, rounds=2, transport=transport)
        raw[transport] = {"digits": digits, "big10": big}
        fit = big["fit_s"][1]  # round 2: round 1 also waits for node start-up
        moved = BIG_ELEMENTS * 4 * 2 * 10
        model_mib = BIG_ELEMENTS * 4 / 2**20
        rows.append(
            {
                "transport": transport,
                "digits_median_ms_2_10": digits["median_2_10"] * 1e3,
                "digits_p90_ms_2_10": digits["p90_2_10"] * 1e3,
                "digits_all_ok": digits["all_ok"],
                "100MB_x10_fit_s": fit,
                "100MB_x10_MB_per_s": moved / fit / MB,
                "server_peak_minus_idle_x_model": (
                    big["server_peak_hwm_mb"] - big["server_idle_rss_mb"]
                )
                / model_mib,
            }
        )
    report(
        "mqtt",
        "MQTT vs gRPC: digits 10 nodes (targets: MQTT median <= 100 ms); 100 MB model to "
        "10 nodes and back, whole fit phase (target: >= 100 MB/s)",
        rows,
        raw=raw,
    )


if __name__ == "__main__":
    main()
