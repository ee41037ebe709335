"""`fedge sim`, run as a user runs it: the installed console script in a real process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits"
FEDGE = Path(sys.executable).parent / "fedge"


def fedge(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert FEDGE.exists(), f"the fedge console script should be installed at {FEDGE}"
    return subprocess.run(
        [str(FEDGE), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def sim_results(tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "results.json"
    run = fedge("sim", "--config", DIGITS / "fedge.toml", "--out", out, *extra, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    return json.loads(out.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return sim_results(tmp_path_factory.mktemp("inprocess"))


def test_sim_writes_five_rounds_of_results(in_process: dict[str, Any]) -> None:
    rounds = in_process["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    for record in rounds:
        assert record["status"] == "ok"
        assert record["participants"] == list(range(10))
        assert record["failures"] == {}
        assert set(record["metrics"]) == {"loss", "accuracy"}
        assert set(record["evaluate_metrics"]) >= {"loss", "accuracy"}  # fraction_evaluate
        assert record["wall_time"] > 0
        assert record["num_examples"] > 0
    assert in_process["initial_metrics"]["accuracy"] < 0.2
    assert rounds[-1]["metrics"]["accuracy"] >= 0.92
    assert in_process["wall_time"] >= sum(r["wall_time"] for r in rounds)


def test_sim_prints_a_table_of_the_rounds(tmp_path: Path) -> None:
    run = fedge("sim", "--config", DIGITS / "fedge.toml", "--quiet", "--rounds", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "fedge: 2 rounds" in run.stdout
    assert "accuracy" in run.stdout
    assert not list(tmp_path.iterdir()), "nothing is written without --out"


def test_process_backend_gives_the_same_results(in_process: dict[str, Any], tmp_path: Path) -> None:
    processes = sim_results(tmp_path, "--backend", "process", "--quiet")

    def without_timings(results: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if not k.endswith("_time")} for r in results["rounds"]]

    assert processes["initial_metrics"] == in_process["initial_metrics"]
    assert without_timings(processes) == without_timings(in_process)
    assert processes["rounds"][-1]["metrics"] == in_process["rounds"][-1]["metrics"]


# --- mistakes: one line naming the problem, a non-zero exit, no traceback ---------------

APP = '[app]\ntarget = "app:create_app"\n'


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (APP + '[run]\nrounds = "five"\n', ["run.rounds", "'five'"]),
        (APP + "[run]\nroundz = 5\n", ["run.roundz"]),
        (APP + "[simulation]\nstragglers = 2\n", ["simulation.stragglers", "2"]),
        (APP + "[simulaton]\nbackend = 'process'\n", ["simulaton"]),
        (APP + "[strategy]\nname = 'fedfancy'\n", ["strategy.name", "'fedfancy'"]),
        (APP + "[strategy]\nfraction_fit = 0\n", ["strategy.fraction_fit", "0"]),
        (APP + "[strategy]\nmu = 0.1\n", ["strategy.mu"]),
        ('[app]\ntarget = "create_app"\n', ["app.target", "'create_app'"]),
        (APP + "[run\nrounds = 5\n", ["not valid TOML"]),
        ('[app]\ntarget = "nomodule:create_app"\n', ["cannot import 'nomodule'"]),
        (
            APP + "options = { partiton = 'iid' }\n",
            ["app.target", "unexpected keyword argument 'partiton'"],
        ),
        (
            APP + "options = { partition = 'by-zipcode' }\n",
            ["app.options.partition", "'by-zipcode'"],
        ),
    ],
    ids=[
        "wrong-type",
        "unknown-run-key",
        "out-of-range",
        "unknown-section",
        "unknown-strategy",
        "bad-strategy-value",
        "unknown-strategy-parameter",
        "bad-target",
        "invalid-toml",
        "missing-module",
        "misspelt-app-option",
        "bad-app-option-value",
    ],
)
def test_a_bad_config_fails_with_a_message_not_a_traceback(
    tmp_path: Path, toml: str, expected: list[str]
) -> None:
    shutil.copy(DIGITS / "app.py", tmp_path / "app.py")  # so the app itself can be imported
    config = tmp_path / "bad.toml"
    config.write_text(textwrap.dedent(toml))

    run = fedge("sim", "--config", config, "--quiet", "--out", tmp_path / "out.json", cwd=tmp_path)

    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert "error:" in run.stderr
    for text in expected:
        assert text in run.stderr
    assert not (tmp_path / "out.json").exists()


def test_a_missing_config_file_is_reported(tmp_path: Path) -> None:
    run = fedge("sim", "--config", tmp_path / "nowhere.toml", cwd=tmp_path)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert "nowhere.toml does not exist" in run.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--backend", "threads"], "'threads'"),
        (["--rounds", "0"], "rounds must be >= 1, got 0"),
    ],
)
def test_bad_command_line_overrides_are_reported(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    run = fedge("sim", "--config", DIGITS / "fedge.toml", "--quiet", *args, cwd=tmp_path)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert expected in run.stderr


def test_an_error_prints_as_one_line_with_brackets_kept(tmp_path: Path) -> None:
    (tmp_path / "picky.py").write_text(
        textwrap.dedent(
            """
            import fedge

            def create_app(num_clients, seed, **options):
                raise fedge.ConfigError(
                    "[app.options] needs data_dir: the directory with this site's records, "
                    "e.g. data_dir = '/var/lib/hospital-a/records' " + "x" * 80
                )
            """
        )
    )
    config = tmp_path / "fedge.toml"
    config.write_text('[app]\ntarget = "picky:create_app"\n')

    run = fedge("sim", "--config", config, "--quiet", cwd=tmp_path)

    assert run.returncode != 0
    assert run.stderr.startswith("error: [app.options] needs data_dir")  # not taken as markup
    assert run.stderr.rstrip("\n").count("\n") == 0, "one line, however long"
    assert "x" * 80 in run.stderr
