"""svi-bench's issue-24 rows: the peers' 8-bit AdamW (bitsandbytes, torchao: benchmarks/peers.py) and our
bf16- and int8-state rows. Their memory is counted from the live tensors, quantised codes and scales included; a
peer that is not installed, or our optimizers without ``state_dtype``, give a skipped row with the reason,
never a failed run. The real peers are tested where they are installed (the ``bench`` extra)."""
import importlib
import json
import math
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import svi_kernels
from svi_kernels._entry import load

microbench = load("microbench")
_pkg = microbench.__package__
rows_mod = importlib.import_module(_pkg + ".rows")
peers = importlib.import_module(_pkg + ".peers")
state_bytes = importlib.import_module(_pkg + ".state_bytes")
targets = importlib.import_module(_pkg + ".targets")
traffic = importlib.import_module(_pkg + ".traffic")
RowUnavailable = importlib.import_module(_pkg + ".unavailable").RowUnavailable

BF16_ROWS = ("adamw_bf16_state", "adam_sls_bookkeeping_bf16_state", "salsa_search_bookkeeping_bf16_state",
             "layerwise_adam_sls_bookkeeping_bf16_state")
INT8_ROWS = tuple(name.replace("_bf16_", "_int8_") for name in BF16_ROWS)
PEER_ROWS = ("bnb_adamw8bit", "torchao_adamw8bit")


def _ctx(sizes, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen).to(dtype)) for s in sizes]
    grads = [1e-3 * torch.randn(*s, generator=gen).to(dtype) for s in sizes]
    for p, g in zip(params, grads):
        p.grad = g
    return rows_mod.Context(params, grads, torch.device("cpu"), dtype,
                            rows_mod.TrivialClosure(torch.device("cpu"), params))


def _row(name, backend="reference"):
    return next(r for r in rows_mod.build_rows([backend]) if r.name == name)


def _other_bytes(opt, ctx):
    return state_bytes.state_bytes(opt, exclude=ctx.params + ctx.grads)


# ---- the peers --------------------------------------------------------------------------------------------
def test_the_bench_extra_pins_the_peers_measured():
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("pyproject.toml is not beside the tests (the wheel check copies tests/ alone)")
    bench = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["bench"]
    for package, version in peers.PINNED.items():
        assert f"{package}=={version}" in bench


def test_a_missing_peer_is_a_skipped_row_that_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    for module in ("bitsandbytes", "torchao", "torchao.optim"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, installed or not
    out_json = tmp_path / "bench.json"
    rc = microbench.main(["--workload", "tiny", "--backend", "reference", "--rows", ",".join(PEER_ROWS),
                          "--repeats", "1", "--warmup", "1", "--stream-numel", "100000", "--json", str(out_json),
                          "--plot", "", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    for name, package in (("bnb_adamw8bit", "bitsandbytes"), ("torchao_adamw8bit", "torchao")):
        line = next(s for s in printed.splitlines() if s.startswith(f"skipped tiny: {name} [{package}]"))
        assert f"{package} is not installed" in line and f"{package}=={peers.PINNED[package]}" in line
        assert "Error" not in line  # the reason, not an exception's name
    assert "peers: bitsandbytes" in printed
    assert [r["name"] for r in json.loads(out_json.read_text())] == ["torch_adamw_fused"]


def test_no_peers_leaves_their_rows_out():
    names = {r.name for r in rows_mod.build_rows(["reference"], peers=False)}
    assert not names & set(PEER_ROWS) and "torch_adamw_fused" in names
    peer_rows = [r for r in rows_mod.build_rows(["reference", "cpu"]) if r.kind == "peer"]
    assert sorted(r.name for r in peer_rows) == sorted(PEER_ROWS)  # once, not per backend


def test_the_peers_traffic_counts_8_bit_moments_with_their_scales():
    ctx = _ctx([(3,)])
    for name in PEER_ROWS:
        row = _row(name)
        # p read+written (8), g read (4), m and v read+written at one byte and a 4-byte scale per 256 elements
        assert traffic.bytes_per_param(row.phases(ctx), 4, row.traffic_state_itemsize(None, 4)) == \
            pytest.approx(8 + 4 + 4 * (1 + 4 / 256))


def test_bitsandbytes_8_bit_state_is_counted_codes_scales_and_maps():
    pytest.importorskip("bitsandbytes")
    ctx = _ctx([(64, 128), (100,)])  # 8192 elements quantised; 100 stay fp32 (under 4096)
    step, opt = _row("bnb_adamw8bit").build(ctx)
    step()
    step()
    big = opt.state[ctx.params[0]]
    assert big["state1"].dtype == big["state2"].dtype == torch.uint8
    assert big["absmax1"].numel() == math.ceil(8192 / peers.BLOCK)  # the block the traffic model assumes
    codes, scales, maps, fp32_small = 2 * 8192, 2 * 32 * 4, 2 * 256 * 4, 2 * 100 * 4
    assert _other_bytes(opt, ctx) == codes + scales + maps + fp32_small
    # it trains: the parameters moved
    assert not torch.equal(ctx.params[1].detach(), _ctx([(64, 128), (100,)]).params[1].detach())


def test_torchao_8_bit_state_is_counted_through_its_tensor_subclass():
    pytest.importorskip("torchao.optim")
    ctx = _ctx([(64, 128)])  # one shape: its first step compiles the update once
    step, opt = _row("torchao_adamw8bit").build(ctx)
    step()
    m = opt.state[ctx.params[0]]["exp_avg"]
    assert type(m) is not torch.Tensor and "codes" in m.__tensor_flatten__()[0]
    codes, scales, maps = 2 * 8192, 2 * 32 * 4, 2 * 256 * 4
    step_count, lr = 4, 4  # a 0-d fp32 step per parameter, the group's lr as a 0-d tensor
    assert _other_bytes(opt, ctx) == codes + scales + maps + step_count + lr


# ---- ours, bf16 state -------------------------------------------------------------------------------------
class _NoStateDtype(svi_kernels.AdamW):
    def __init__(self, params, lr=1e-3, weight_decay=1e-2, *, backend=None):
        super().__init__(params, lr=lr, weight_decay=weight_decay, backend=backend)


def test_bf16_rows_are_skipped_with_the_reason_while_state_dtype_is_not_taken(monkeypatch):
    monkeypatch.setattr(svi_kernels, "AdamW", _NoStateDtype)
    with pytest.raises(RowUnavailable, match="does not take state_dtype= yet"):
        _row("adamw_bf16_state").build(_ctx([(5,)]))
    _row("adamw").build(_ctx([(5,)]))  # the fp32-state row is built as before

    def other_error(*args, **kwargs):
        raise TypeError("something else")
    monkeypatch.setattr(svi_kernels, "AdamW", other_error)
    with pytest.raises(TypeError, match="something else"):  # not every TypeError is a missing keyword
        _row("adamw_bf16_state").build(_ctx([(5,)]))


def _built(name, ctx):
    try:
        return _row(name).build(ctx)
    except RowUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", BF16_ROWS)
def test_bf16_state_rows_keep_4_bytes_per_fp32_parameter(name):
    ctx = _ctx([(300,), (17, 3), (64,), (5, 5)])
    step, opt = _built(name, ctx)
    for _ in range(3):
        step()
    moments = [t for s in opt.state.values() if isinstance(s, dict) for t in s.values()
               if isinstance(t, torch.Tensor) and t.numel() > 1]
    assert moments and all(t.dtype == torch.bfloat16 for t in moments)
    per_param = state_bytes.state_bytes_per_param(opt, ctx.params)
    assert 4.0 <= per_param <= targets.STATE_BYTES_LIMITS[name]


@pytest.mark.parametrize("name,fp32_state,bf16_state", [
    ("adamw_bf16_state", 28, 20),                       # p 8, g 4, m and v read+written
    ("adam_sls_bookkeeping_bf16_state", 60, 46),         # check 4, save 12, trial in place 14, final 16
    ("salsa_search_bookkeeping_bf16_state", 40, 30),     # check 4, save 12, trial 14
    ("layerwise_adam_sls_bookkeeping_bf16_state", 4 + 20 + 36 / 10 + 16 * 9 / 10, 4 + 12 + 30 / 10 + 12 * 9 / 10),
])
def test_bf16_state_rows_move_2_byte_state(name, fp32_state, bf16_state):
    ctx = _ctx([(3,)] * 20)
    row = _row(name)
    assert traffic.bytes_per_param(row.phases(ctx), 4) == pytest.approx(fp32_state)  # the same phases...
    assert traffic.bytes_per_param(row.phases(ctx), 4, row.traffic_state_itemsize(None, 4)) == \
        pytest.approx(bf16_state)  # ...with 2-byte state


# ---- ours, int8 state -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", INT8_ROWS)
def test_int8_state_rows_keep_at_most_2_1_bytes_per_fp32_parameter(name):
    ctx = _ctx([(300, 40), (17, 3), (640,), (5, 5)])
    step, opt = _built(name, ctx)
    for _ in range(3):
        step()
    codes = [t for s in opt.state.values() if isinstance(s, dict) for k, t in s.items()
             if isinstance(t, torch.Tensor) and k in ("exp_avg", "exp_avg_sq")]
    assert codes and {t.dtype for t in codes} == {torch.int8, torch.uint8}
    per_param = state_bytes.state_bytes_per_param(opt, ctx.params)
    assert 2.0 < per_param <= targets.STATE_BYTES_LIMITS[name]


@pytest.mark.parametrize("name", INT8_ROWS)
def test_int8_state_rows_move_1_byte_codes_and_their_scales(name):
    """The int8 row's traffic is its bf16 row's with each 2-byte state access at 1 + 4/256 bytes."""
    ctx = _ctx([(3,)] * 20)
    row, bf16_row = _row(name), _row(name.replace("_int8_", "_bf16_"))
    fp32 = traffic.bytes_per_param(row.phases(ctx), 4)
    bf16 = traffic.bytes_per_param(bf16_row.phases(ctx), 4, bf16_row.traffic_state_itemsize(None, 4))
    accesses = (fp32 - bf16) / 2
    assert traffic.bytes_per_param(row.phases(ctx), 4, row.traffic_state_itemsize(None, 4)) == \
        pytest.approx(fp32 - accesses * (4 - (1 + 4 / 256)))


def test_int8_rows_are_skipped_where_the_ops_do_not_take_int8_state(monkeypatch):
    monkeypatch.setattr(rows_mod, "_takes_int8_state", lambda backend, device: False)
    with pytest.raises(RowUnavailable, match="do not take int8 state yet"):
        _row("adamw_int8_state").build(_ctx([(5,)]))


def test_state_dtype_targets():
    def row(name, workload, ratio, state, dtype="fp32"):
        return {"name": name, "backend": "cpu", "kind": "ours", "workload": workload, "ms": 1.0, "dtype": dtype,
                "ratio_to_torch_fused_adamw": ratio, "fraction_of_stream": 0.9, "gbps": 10.0, "compare_to": None,
                "state_bytes_per_param": state}
    rows = [row("adamw_bf16_state", "huge", 0.75, 4.01), row("adamw_bf16_state", "bert-base", 0.85, 4.01),
            row("adamw_bf16_state", "minilm", 0.85, 4.2), row("adam_sls_bookkeeping_bf16_state", "minilm", 3.0, 4.0),
            row("adamw_bf16_state", "minilm", 0.85, 2.0, dtype="bf16"), row("adamw_int8_state", "huge", 0.65, 2.03),
            row("adamw_int8_state", "huge", 0.75, 2.03), row("layerwise_adam_sls_bookkeeping_int8_state", "minilm", 3.0, 2.2),
            row("adamw_int8_state", "host-10k", 3.0, 2.19)]
    targets.evaluate(rows)
    assert rows[0]["status"] == "ok"
    assert "0.8x" in rows[1]["status"] and rows[1]["status"].startswith("MISSING")
    assert "0.8x" not in rows[2]["status"] and "state <= 4.05 B/param" in rows[2]["status"]  # speed: huge, bert-base
    assert rows[3]["status"] == "ok" and rows[4]["status"] == "-"  # the memory limit is for fp32 parameters
    assert rows[5]["status"] == "ok" and "0.7x" in rows[6]["status"] and rows[6]["status"].startswith("MISSING")
    assert "state <= 2.1 B/param" in rows[7]["status"] and rows[7]["status"].startswith("MISSING")
    # 64-element tensors: AdamW's per-tensor step and an int8 block per moment are printed, not held to it
    assert "state <=" not in rows[8]["status"]
