"""`bench/gpu/check.py` at tiny sizes on CPU, so the script a GPU run depends on cannot rot:
every section runs and the correctness it checks holds here too."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "check.py"


def test_the_gpu_check_script_runs_every_section_at_tiny_sizes(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.main(["--out", str(tmp_path), "--tiny"]) == 0
    sections = json.loads((tmp_path / "check.json").read_text())["sections"]
    assert list(sections) == ["environment", "kernel", "correctness", "speed", "guard", "quantized"]
    assert not [name for name, result in sections.items() if "error" in result]
    assert sections["kernel"]["all_match"] and len(sections["kernel"]["rows"]) == 8
    assert sections["correctness"]["ok"], sections["correctness"]
    modes = sections["speed"]["tiny"]["modes"]
    assert set(modes) == {"hf_generate", "engine_eager", "engine_compiled", "engine_compiled_probe"}
    assert all(m["tokens_per_s"] > 0 and m["gb_per_s"] >= 0 for m in modes.values())
    assert sections["guard"]["runs"]["escalating"][0]["checks"] > 0
    quantized = sections["quantized"]
    assert quantized["ok"] and set(quantized["speed"]) == {"none", "int8", "int4"}, quantized
    assert all(row["engine_compiled"]["tokens_per_s"] > 0 for row in quantized["speed"].values())
