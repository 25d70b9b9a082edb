"""svi-bench without matplotlib and tqdm (an install without the `bench` extra): the measurements,
table and JSON stand, the plot is skipped with a note on how to get it, and the exit code is 0."""
import json
import sys

from svi_kernels import bench

ARGS = ["--workload", "tiny", "--backend", "reference", "--repeats", "1", "--warmup", "1",
        "--stream-numel", "100000", "--no-progress"]


def test_bench_exits_0_without_matplotlib(tmp_path, capsys, monkeypatch):
    for top in ("matplotlib", "tqdm"):
        for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, top, None)  # `import matplotlib` now raises ModuleNotFoundError
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = bench.main(ARGS + ["--json", str(out_json), "--plot", str(out_png)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "torch_adamw_fused" in printed  # the table
    assert json.loads(out_json.read_text())  # the JSON
    assert not out_png.exists()
    assert "plot skipped: matplotlib is not installed" in printed and "pip install .[bench]" in printed
    assert printed.index("wrote " + str(out_json)) < printed.index("plot skipped")
