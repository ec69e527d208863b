"""--device names: every command resolves them the same way and refuses what this machine lacks."""

import pytest
import torch

from unidiffuser.cli import main
from unidiffuser.devices import device_option, resolve_device


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", local_rank=3) == torch.device("cpu")


def test_auto_shares_the_gpus_among_more_processes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [resolve_device("auto", rank) for rank in range(3)] == [
        torch.device("cuda:0"),
        torch.device("cuda:1"),
        torch.device("cuda:0"),
    ]
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(
        ValueError, match=r"device 'cuda:2': torch sees 2 CUDA device\(s\).*use cuda:0 to cuda:1"
    ):
        resolve_device("cuda:2")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("gpu", "not a device name; use cpu, cuda, cuda:N or auto"),
        ("meta", "only CPUs and CUDA GPUs are supported"),
        ("cuda", "no CUDA device is available; use cpu or auto"),
    ],
)
def test_bad_names_say_what_to_use(monkeypatch, name, problem):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=f"device '{name}': {problem}"):
        resolve_device(name)
    with pytest.raises(SystemExit, match=f"^tool: --device '{name}': {problem}"):
        device_option(name, "tool")


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--mode", "t2i", "--prompt", "a red circle", "--device", "cuda"],
        ["eval", "shapes", "--device", "cuda"],
        ["recipe", "shapes", "--out", "unused", "--device", "cuda"],
        ["serve", "--device", "cuda"],
    ],
)
def test_commands_refuse_a_missing_gpu_before_any_work(monkeypatch, tmp_path, argv):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^unidiffuser \w+: --device 'cuda': no CUDA device is available"):
        main(argv)
    assert not any(tmp_path.iterdir())  # nothing written
