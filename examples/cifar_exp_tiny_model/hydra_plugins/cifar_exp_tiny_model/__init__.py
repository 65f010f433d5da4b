"""Hydra finds conf/model/tiny_mlp.yaml through this plugin: Hydra imports every module
under `hydra_plugins` when it starts, so keep it this small."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class TinyModelSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="cifar_exp_tiny_model",
                           path="pkg://cifar_exp_tiny_model/conf")
