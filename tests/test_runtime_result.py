"""report_result: a torch-free program hands its value to a search trial's driver."""

from __future__ import annotations

import os
import subprocess
import sys

from aimass_hpc.launch.search_driver import read_trial_value


def test_a_plain_program_reports_its_value_without_torch(tmp_path):
    code = (
        "import sys\n"
        "from aimass_hpc.runtime import report_result\n"
        "report_result(0.25, accuracy=0.9)\n"
        "assert 'torch' not in sys.modules\n"
        "print('not a number')\n"
    )
    env = {"AIMASS_RUN_DIR": str(tmp_path), "PYTHONPATH": os.environ["PYTHONPATH"]}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert read_trial_value(tmp_path, "accuracy", "command") == (0.9, "result.json:accuracy")
    assert read_trial_value(tmp_path, "loss", "command") == (0.25, "result.json:value")
