"""The TOML config of a run: the shipped examples load, and every mistake is a
`ConfigError` that names the offending key and the value found there."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

import fedge
from fedge.app import load_app
from fedge.config import build_strategy, load_config, parse_config
from fedge.errors import ConfigError
from fedge.strategy import FedAvg, FedProx

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits" / "fedge.toml"

VALID = """
[app]
target = "app:create_app"

[run]
num_clients = 4
rounds = 2
"""


def write(tmp_path: Path, text: str, name: str = "fedge.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, text))
    return str(raised.value)


# --- valid configs -----------------------------------------------------------------------


def test_the_digits_example_config_loads() -> None:
    config = load_config(DIGITS)
    assert config.app.target == "app:create_app"
    assert config.app.options == {"partition": "iid", "epochs": 5, "batch_size": 16, "lr": 0.5}
    assert (config.run.num_clients, config.run.rounds, config.run.seed) == (10, 5, 0)
    assert config.run.round_timeout == 30.0
    assert config.simulation.backend == "inprocess"
    assert config.base_dir == DIGITS.parent
    strategy = config.build_strategy()
    assert isinstance(strategy, FedAvg)
    assert strategy.fraction_evaluate == 0.5


@pytest.mark.parametrize(
    "path", sorted(ROOT.glob("examples/*/fedge.toml")), ids=lambda p: p.parent.name
)
def test_every_example_config_is_valid(path: Path) -> None:
    config = load_config(path)
    assert config.base_dir == path.parent
    assert (path.parent / (config.app.target.split(":")[0] + ".py")).exists()


def test_omitted_sections_take_their_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[app]\ntarget = "app:create_app"\n'))
    assert (config.run.num_clients, config.run.rounds, config.run.seed) == (10, 5, 0)
    assert config.run.max_round_retries == 2
    assert config.simulation.backend == "inprocess"
    assert (config.simulation.stragglers, config.simulation.dropouts) == (0.0, 0.0)
    assert config.fit == {} and config.evaluate == {}
    assert type(config.build_strategy()) is FedAvg


def test_strategy_parameters_and_fit_settings_are_passed_through(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            VALID
            + """
            [strategy]
            name = "FedProx"
            proximal_mu = 0.1
            fraction_fit = 0.5
            min_results = 2

            [fit]
            lr = 0.05
            local_epochs = 3
            """,
        )
    )
    strategy = config.build_strategy()
    assert isinstance(strategy, FedProx)  # the name is not case-sensitive
    assert (strategy.proximal_mu, strategy.fraction_fit, strategy.min_results) == (0.1, 0.5, 2)
    assert config.fit == {"lr": 0.05, "local_epochs": 3}


# --- mistakes name the key and the value -------------------------------------------------


def test_an_unknown_section_is_named(tmp_path: Path) -> None:
    message = config_error(tmp_path, VALID + "[stratgy]\nname = 'fedavg'\n")
    assert "unknown key 'stratgy'" in message
    assert str(tmp_path / "fedge.toml") in message


def test_an_unknown_key_in_run_is_named(tmp_path: Path) -> None:
    message = config_error(tmp_path, VALID + "num_rounds = 5\n")
    assert "unknown key 'run.num_rounds'" in message


def test_a_value_of_the_wrong_type_is_named_with_the_value(tmp_path: Path) -> None:
    message = config_error(tmp_path, VALID.replace("rounds = 2", 'rounds = "five"'))
    assert "'run.rounds' = 'five'" in message
    assert "Expected `int`, got `str`" in message


def test_an_out_of_range_value_is_named_with_the_value(tmp_path: Path) -> None:
    message = config_error(tmp_path, VALID + "[simulation]\nstragglers = 2\n")
    assert "'simulation.stragglers' = 2" in message
    assert "Expected `float` <= 1.0" in message


APP = '[app]\ntarget = "app:create_app"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (APP + "[run]\nnum_clients = 0", "'run.num_clients' = 0"),
        (APP + "[run]\nround_timeout = -1.0", "'run.round_timeout' = -1.0"),
        (APP + "[simulation]\nbackend = 'dask'", "'simulation.backend' = 'dask'"),
        (APP + "[simulation]\nray_address = ''", "'simulation.ray_address' = ''"),
        (APP + "[simulation]\nworkers = 0", "'simulation.workers' = 0"),
        (APP + "[simulation]\ndropouts = -0.5", "'simulation.dropouts' = -0.5"),
        (APP + "[store]\nurl = 'file:///m'\nprofile = 'p'", "for s3:// stores only"),
        (APP + "opts = {}", "unknown key 'app.opts'"),
        ("run = 5\n" + APP, "'run' = 5"),
    ],
)
def test_other_invalid_values_are_named(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in config_error(tmp_path, text)


def test_an_unknown_strategy_name_lists_the_known_ones(tmp_path: Path) -> None:
    message = config_error(tmp_path, VALID + "[strategy]\nname = 'fedfancy'\n")
    assert "'strategy.name' = 'fedfancy': unknown strategy" in message
    assert "'fedavg'" in message and "'fedprox'" in message


def test_an_unknown_strategy_parameter_is_named(tmp_path: Path) -> None:
    message = config_error(tmp_path, VALID + "[strategy]\nname = 'fedavg'\nmu = 0.1\n")
    assert "['strategy.mu']" in message
    assert "FedAvg" in message
    assert "'fraction_fit'" in message  # and what would have been accepted


def test_a_bad_strategy_value_is_named_with_the_value(tmp_path: Path) -> None:
    message = config_error(tmp_path, VALID + "[strategy]\nfraction_fit = 0\n")
    assert message == "strategy.fraction_fit must be in (0, 1], got 0"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('fraction_fit = "high"', "'strategy.fraction_fit' = 'high'"),
        ('clients_per_round = "3"', "'strategy.clients_per_round' = '3'"),
        ("min_results = 1.5", "'strategy.min_results' = 1.5"),
        ("accept_partial_work = 1", "'strategy.accept_partial_work' = 1"),
    ],
)
def test_a_strategy_value_of_the_wrong_type_is_named(
    tmp_path: Path, line: str, expected: str
) -> None:
    assert expected in config_error(tmp_path, VALID + f"[strategy]\n{line}\n")


def test_build_strategy_alone_defaults_to_fedavg() -> None:
    assert type(build_strategy({})) is FedAvg
    assert build_strategy({"fraction_evaluate": 1}).fraction_evaluate == 1


def test_invalid_toml_is_reported_with_the_file(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[run\nrounds = 5\n")
    assert message.startswith(f"{tmp_path / 'fedge.toml'}: not valid TOML")
    assert "line 1" in message


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path / "nowhere.toml")
    assert str(raised.value) == f"config file {tmp_path / 'nowhere.toml'} does not exist"


def test_a_missing_app_section_is_named(tmp_path: Path) -> None:
    assert "missing key 'app'" in config_error(tmp_path, "[run]\nrounds = 2\n")


@pytest.mark.parametrize("target", ["app", "app:", ":create_app", "my app:make", "app:make()"])
def test_a_malformed_app_target_is_named(tmp_path: Path, target: str) -> None:
    message = config_error(tmp_path, f'[app]\ntarget = "{target}"\n')
    assert f"'app.target' = {target!r}" in message


def test_base_dir_cannot_be_set_from_the_file(tmp_path: Path) -> None:
    assert "unknown key 'base_dir'" in config_error(tmp_path, "base_dir = '/'\n" + VALID)


def test_parse_config_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^settings: unknown key 'extra'"):
        parse_config({"app": {"target": "a:b"}, "extra": 1}, source="settings")


# --- loading the app the config names ----------------------------------------------------


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with an app module of a name unique to this test; sys.path is restored."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    module = f"app_{abs(hash(tmp_path))}"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            import fedge

            def create_app(num_clients, seed, scale=1.0):
                return fedge.App(lambda cid: None, {"scale": scale, "n": num_clients})

            def not_an_app(num_clients, seed):
                return {"client_fn": None}

            NOT_CALLABLE = 3
            """
        )
    )
    return tmp_path


def module_of(app_dir: Path) -> str:
    return next(app_dir.glob("app_*.py")).stem


def test_load_app_calls_the_factory_with_run_settings_and_options(app_dir: Path) -> None:
    app = load_app(f"{module_of(app_dir)}:create_app", app_dir, num_clients=3, seed=0, scale=2)
    assert isinstance(app, fedge.App)
    assert app.initial_weights == {"scale": 2, "n": 3}


@pytest.mark.parametrize(
    ("attr", "options", "expected"),
    [
        ("create_app", {"scael": 2.0}, "got an unexpected keyword argument 'scael'"),
        ("missing", {}, "has no callable 'missing'"),
        ("NOT_CALLABLE", {}, "has no callable 'NOT_CALLABLE'"),
        ("not_an_app", {}, "returned dict, expected fedge.App"),
    ],
)
def test_load_app_mistakes_are_config_errors(
    app_dir: Path, attr: str, options: dict[str, object], expected: str
) -> None:
    target = f"{module_of(app_dir)}:{attr}"
    with pytest.raises(ConfigError) as raised:
        load_app(target, app_dir, num_clients=3, seed=0, **options)
    assert f"app.target {target!r}" in str(raised.value)
    assert expected in str(raised.value)


def test_load_app_reports_a_module_it_cannot_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ConfigError) as raised:
        load_app("no_such_module_xyz:create_app", tmp_path, num_clients=1, seed=0)
    assert "cannot import 'no_such_module_xyz'" in str(raised.value)
    assert str(tmp_path.resolve()) in str(raised.value)


def test_apps_of_one_module_name_in_two_directories_load_each_its_own(tmp_path: Path) -> None:
    """Every example names its module `app`: one process loading two of them (a test run,
    a simulation's worker) gets each directory's own, whatever was imported before, and
    a directory already on sys.path goes first again."""
    saved_path, saved_app = list(sys.path), sys.modules.pop("app", None)
    try:
        dirs = [tmp_path / "one", tmp_path / "two"]
        for number, where in enumerate(dirs, 1):
            where.mkdir()
            (where / "app.py").write_text(
                "import numpy as np\nimport fedge\n"
                "def create_app(num_clients, seed):\n"
                f"    return fedge.App(lambda cid: None, {{'w': np.full(1, {number}.0)}})\n"
            )
        for where, number in [(dirs[0], 1), (dirs[1], 2), (dirs[0], 1)]:
            app = load_app("app:create_app", where, num_clients=1, seed=0)
            assert app.initial_weights["w"][0] == number
            assert sys.path[0] == str(where)
    finally:
        sys.path[:] = saved_path
        sys.modules.pop("app", None)
        if saved_app is not None:
            sys.modules["app"] = saved_app
