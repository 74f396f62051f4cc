"""The named experiments of a config (bd/paper/experiments.py): the ablations section, read through
its params dataclass, gives the BD and Filling variants and their seeds."""

from __future__ import annotations

import pytest

from bd.errors import ConfigError
from bd.methods import DIRECTIONS
from bd.mil import base
from bd.paper.experiments import experiments, seeds_for, target_experiments


def config(**ablations):
    return {"training": {"methods": ["bd", "filling"], "seeds": [0, 1]}, "ablations": ablations}


def test_ablations_name_one_experiment_each():
    cfg = config(directions=["none", "both"], prompt_lengths=[10], lambda_grid=[[0.6, 0.5], [1, 0]],
                 clinical_expansions=[20], seeds=[3, 4])
    found = experiments(cfg)
    assert found["bd-dir-none"] == {"method": "bd", "directions": "none"}
    assert found["bd-prompt-10"] == {"method": "bd", "prompt_length": 10}
    assert found["bd-lm-1-ls-0"] == {"method": "bd", "lambda_m": 1.0, "lambda_s": 0.0}
    assert found["filling-cx20"] == {"method": "filling", "clinical_expansion": 20}
    assert target_experiments(cfg, "ablations") == ["bd-dir-none", "bd-dir-both", "bd-prompt-10", "bd-lm-0.6-ls-0.5",
                                                     "bd-lm-1-ls-0"]
    assert seeds_for(cfg, "bd-dir-none") == [3, 4] and seeds_for(cfg, "bd") == [0, 1]


def test_without_ablations_no_variant_and_the_declared_seed():
    cfg = {"training": {"methods": ["bd"], "seeds": [0]}}
    assert target_experiments(cfg, "ablations") == []
    assert seeds_for(cfg, "bd-dir-both") == [0]  # AblationParams.seeds' default


@pytest.mark.parametrize(("ablations", "key"), [
    ({"directions": ["sideways"]}, r"ablations\.directions\[0\]"), ({"lambda_grid": [[0.6]]}, r"ablations\.lambda_grid\[0\]"),
    ({"seed": [0]}, "ablations.seed"),
])
def test_a_bad_ablations_section_names_the_key(ablations, key):
    with pytest.raises(ConfigError, match=key):
        experiments(config(**ablations))


def test_the_models_use_the_directions_the_config_offers():
    assert base.DIRECTIONS is DIRECTIONS
