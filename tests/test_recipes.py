"""ensdiv.recipes: every published recipe trains end to end (one step, on a tiny CIFAR-format
folder), records its name and overrides, and documents itself."""

import json

import pytest
from test_data import make_cifar

from ensdiv.cli import main
from ensdiv.errors import EnsdivError
from ensdiv.recipes import RECIPES, apply_recipe, recipe
from ensdiv.training import TrainConfig


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar(root)  # 20 training images: one step per epoch at every recipe's batch size
    return root


def _train(args, out, cifar):
    return main(["train", *args, "--epochs", "1", "--members", "2", "--data-root", str(cifar),
                 "--out", str(out), "--quiet", "--threads", "1"])


def test_every_recipe_is_a_valid_config_of_its_method():
    for r in RECIPES.values():
        fields = {**r.config_fields(), **({"init_from": "x"} if r.needs_init else {})}
        config = TrainConfig(**fields).validate()
        assert config.diversity == r.method and config.recipe == r.name
        for k, v in r.settings.items():
            assert getattr(config, k) == v, (r.name, k)
        assert r.source and r.follows


@pytest.mark.parametrize("name", [n for n, r in RECIPES.items() if not r.needs_init])
def test_each_recipe_trains_one_step_and_records_itself(name, cifar, tmp_path):
    assert _train(["--recipe", name], tmp_path / name, cifar) == 0
    saved = json.loads((tmp_path / name / "config.json").read_text())
    assert saved["recipe"] == name
    # --epochs and --members were given: the run records them as overrides
    assert saved["recipe_overrides"] == ["epochs", "members"]
    for k, v in RECIPES[name].settings.items():
        if k not in ("epochs", "members"):
            assert saved[k] == (list(v) if isinstance(v, tuple) else v), k
    metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
    assert len(metrics) == 1 and metrics[0]["lr"] == RECIPES[name].settings["lr"]


def test_dverge_starts_from_a_trained_plain_ensemble(cifar, tmp_path, capsys):
    base = tmp_path / "base"
    assert _train(["--recipe", "baseline-cifar10"], base, cifar) == 0
    assert _train(["--recipe", "dverge-cifar10"], tmp_path / "no-init", cifar) == 2
    assert "starts from a trained plain ensemble: give --init-from RUN" in \
        capsys.readouterr().err
    assert not (tmp_path / "no-init").exists()
    out = tmp_path / "dverge"
    assert _train(["--recipe", "dverge-cifar10", "--init-from", str(base)], out, cifar) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["init_from"] == str(base) and len(saved["init_weights"]) == 16


def test_a_flag_overrides_the_recipe_and_the_run_says_so():
    fields, over = apply_recipe("trs-cifar10", {"lr": 0.01, "seed": 2, "epochs": 120})
    assert fields["lr"] == 0.01 and fields["trs_eps_start"] == 0.01 and over == ["lr"]
    with pytest.raises(EnsdivError, match="unknown recipe 'sgd'; choose one of: adp-cifar10"):
        recipe("sgd")


def test_recipes_command_lists_and_shows(capsys):
    assert main(["recipes"]) == 0
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in RECIPES)
    assert main(["recipes", "trs-cifar10"]) == 0
    shown = capsys.readouterr().out
    assert "--lam 40" in shown and "--trs-eps-start 0.01" in shown and "issue #1" in shown
