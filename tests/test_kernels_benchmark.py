"""benchmarks/kernels.py still runs (tiny sizes) and writes the JSON a GPU run will fill in."""
import json
import os
import sys
from pathlib import Path

import torch

import launch

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runs_and_writes_its_json(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the benchmark times the real path of the device
    device = "cuda" if torch.cuda.is_available() else "cpu"
    proc = launch.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--device", device,
                       "--numel", "20000", "--preset", "small", "--resample-every", "3", "--reps", "1",
                       "--out", str(tmp_path)], env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = tmp_path.glob("kernels_*.json")
    result = json.loads(path.read_text())
    assert set(result["kernels"]["ops"]) >= {"copy (reference)", "draw_support", "fused_adamw_step"}
    rows = result["grouped"]["rows"]
    for key in ("step_grouped_check", "step_grouped_nocheck", "step_per_tensor_check", "redraw_grouped",
                "redraw_per_tensor", "adamw_baseline"):
        assert rows[key]["device_s"] > 0 and rows[key]["host_s"] > 0, key
    assert [r["skip_nonfinite"] for r in result["optimizer"]] == [True, False]
