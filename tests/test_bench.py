"""bench.py: the figures (smoothing, each figure drawn from run outputs of the right shape), the quality
table, the command line."""
import json
import math

import pytest

import bench
import train_kd


def test_smoothed_is_unbiased_and_follows_a_step():
    assert bench.smoothed([2.0] * 5) == pytest.approx([2.0] * 5)        # no pull towards 0 at the start
    curve = bench.smoothed([1.0] * 50 + [0.0] * 400)
    assert curve[49] == pytest.approx(1.0) and curve[-1] < 1e-3
    assert all(b <= a + 1e-12 for a, b in zip(curve, curve[1:]))       # never rises after the step down


def test_figures_are_drawn_from_the_runs_json(tiny_data, tiny_teacher, tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot", reason="matplotlib is an optional dependency")
    rows = [dict(method="teacher", bits=32, bits_per_weight=32.0, val_loss=1.0, ppl=2.7, trained=False, seconds=0)]
    rows += [dict(method=m, bits=b, bits_per_weight=b + 0.3, val_loss=1.1, ppl=3.0 + 1 / b, trained=m == "lcd",
                  seconds=1.0) for m in ("rtn", "lcd") for b in (2, 3)]
    curves = {"kd": dict(loss=[1.0 / (i + 1) for i in range(60)], stages=[[0, 4]]),
              "lcd+progressive": dict(loss=[1.0 / (i + 2) for i in range(60)], stages=[[0, 8], [20, 4]])}
    (tmp_path / "quality.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "results.json").write_text(json.dumps({"curves": curves}))
    bench.figure_ppl_vs_bits(plt, rows, tmp_path / "ppl.png")
    bench.figure_kd_curves(plt, curves, tmp_path / "curves.png")
    teacher, meta = tiny_teacher
    calib, _ = train_kd.calibration_data(train_kd.load_tokens(meta["dir"], "train"),
                                         dict(seed=0, batch_size=4, calib_batches=2, kd_batch_size=4), 32)
    bench.figure_centroids(plt, teacher, calib, 2, tmp_path / "centroids.png")
    for name in ("ppl.png", "curves.png", "centroids.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bare_flags_switch_a_part_on_and_bad_keys_are_refused():
    saved = dict(quality=bench.quality, bits=bench.bits)
    try:
        bench.apply_overrides(["--quality", "--bits=3"])
        assert bench.quality == 1 and bench.bits == 3
        for bad in (["--bits"], ["--nope=1"], ["--bits=two"], ["--bits=5"]):
            with pytest.raises(SystemExit):
                bench.apply_overrides(bad)
    finally:
        for key, value in saved.items():
            setattr(bench, key, value)


# ---- the quality comparison -----------------------------------------------------------------------

def test_quality_table_rows(tiny_teacher, tmp_path):
    teacher, meta = tiny_teacher
    train_kd.save_teacher(teacher, str(tmp_path / "teacher.pt"))        # quality_table loads it from out_dir
    rows = bench.quality_table(bits_list=(2,), methods=("teacher", "rtn", "gptq"), trained=False,
                               log=lambda *a: None, dataset=meta["dir"], out_dir=str(tmp_path),
                               preset="tiny", device="cpu", eval_batches=2, calib_batches=1, batch_size=4)
    assert [r["method"] for r in rows] == ["teacher", "rtn", "gptq"]
    for r in rows:
        assert set(r) == {"method", "bits", "bits_per_weight", "val_loss", "ppl", "trained", "seconds"}
        assert r["val_loss"] > 0 and r["ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["trained"] is False
    assert rows[0]["bits_per_weight"] == 32 and all(2 < r["bits_per_weight"] < 4 for r in rows[1:])
    assert rows[2]["val_loss"] < rows[1]["val_loss"]          # GPTQ beats RTN at the same bits
