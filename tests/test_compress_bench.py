"""The throughput benchmark runs end to end (tiny input, eager kernels: a smoke test, no timing claims)."""

import importlib.util
import pathlib


def test_benchmark_runs_quick(capsys):
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "compress_throughput.py"
    spec = importlib.util.spec_from_file_location("compress_throughput", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import torch

    threads = torch.get_num_threads()
    try:
        assert mod.main(["--quick", "--numel", "8192", "--repeat", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "qsgd bits=4" in out and "adacomp conv" in out and "eager QSGD" in out
    assert out.count("[PASS]") + out.count("[FAIL]") == 6
