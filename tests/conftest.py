import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # generated data goes to a per-session cache unless CI points MTL_DATA_CACHE somewhere
    if "MTL_DATA_CACHE" not in os.environ:
        os.environ["MTL_DATA_CACHE"] = str(tmp_path_factory.mktemp("data_cache"))
    yield


ALL_TASKS = ["semseg", "depth", "normals", "edges", "classification", "regression"]


@pytest.fixture
def tiny_model():
    from mtl.models import create_model

    return create_model(ALL_TASKS, backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                        decoder={"name": "hps", "channels": 16})
