import platform

import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
    machine_info["device_name"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                                   else platform.processor() or platform.machine())
