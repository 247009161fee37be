import torch

from _common import DEVICES, device_name


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
    machine_info["device_name"] = device_name(DEVICES[-1])
