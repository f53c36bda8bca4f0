"""scripts/gpu_check.sh (run on a lent GPU only): its stage argument is checked before anything runs."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_unknown_stage_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "bogus"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "gpu_check: unknown stage 'bogus' (core, ops, sct, reference)"
    assert not (tmp_path / "out").exists()          # nothing ran, nothing was written



def test_joined_stages_are_each_checked(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "ops,bogus"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "gpu_check: unknown stage 'bogus' (core, ops, sct, reference)"
    assert not (tmp_path / "out").exists()
