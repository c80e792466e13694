"""kernels.gpu_check runs (tiny sizes, through the interpreter on CPU) and skips cleanly."""

import torch

from kernels import gpu_check


def test_smoke_run_passes(capsys):
    assert gpu_check.main(["--smoke", "--only", "rmsnorm", "page_checksum"]) == 0
    out = capsys.readouterr().out
    assert "all ok" in out and "FAIL" not in out


def test_without_cuda_skips_with_a_message(capsys):
    if torch.cuda.is_available():
        return
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
