"""The errors that reach the user in one line (cifar_exp.errors): Hydra's composition
errors, from the real errors Hydra raises for the command lines users type."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from cifar_exp.config import CONF_DIR, builder_keys, known_keys, register_schema
from cifar_exp.errors import one_line_composition_error


def composition_error(*overrides: str) -> HydraException:
    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"), \
            pytest.raises(HydraException) as error:
        compose("config", overrides=list(overrides), return_hydra_config=True)
    return error.value


@pytest.mark.parametrize("overrides,line", [
    (["steps=many"], "steps=many: Value 'many' of type 'str' could not be converted to "
                     "Integer; give steps a value of its type"),
    (["stepz=10"], "stepz is not a config key (did you mean steps? `python -m cifar_exp.run "
                   "--cfg job` lists the keys and their values)"),
    (["optimizer=sgd", "optimizer.momentm=0.5"], "optimizer.momentm is not a config key (did "
                                                 "you mean optimizer.momentum? "),
    (["tracking.urx=x"], "tracking.urx is not a config key (did you mean tracking.uri? "),
    (["nothing_like_it=1"], "nothing_like_it is not a config key (`python -m"),
    (["optimizer=adamx"], "optimizer=adamx: there is no such option; choose one of adam, "
                          "adamw, muon, sgd, sgd_decay"),
    (["steps=("], "steps=( cannot be read (extraneous input '('); quote the value: "
                  "key='...'"),
    (["data.root=a=b"], "data.root=a=b cannot be read (mismatched input '='); quote the "
                        "value"),
    (["data.root=x'y"], "data.root=x'y cannot be read (a character it does not take there)"),
    (["hydra/launcher=joblib", "hydra.launcher.n_jobs=abc"],
     "hydra.launcher.n_jobs=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["+steps=3"], "Could not append to config. An item is already at 'steps'."),
    (["optimizer.momentum=0.5"], "optimizer.momentum: the optimizer chosen has no such key; "
                                 "choose one that has it (e.g. optimizer=muon or sgd) before "
                                 "it on the command line"),
])
def test_each_error_is_one_line_saying_what_to_type(overrides, line):
    said = one_line_composition_error(composition_error(*overrides), known_keys(),
                                      builder_keys())
    assert said.startswith(line)
    assert "\n" not in said and "\t" not in said
    assert "Config search path" not in said and "+stepz" not in said  # no lead into a refusal


def test_known_keys_hold_the_schema_and_every_builder_option():
    keys = known_keys()
    assert {"steps", "tracking.uri", "checkpoint.every", "optimizer.lr", "optimizer.momentum",
            "model.name", "schedule.name"} <= set(keys)
    assert len(keys) == len(set(keys))
    assert builder_keys()["optimizer.momentum"] == ["muon", "sgd"]  # sgd_decay: by sgd
