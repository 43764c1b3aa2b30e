"""Dependencies flow adapters_zoo ← fusion ← serving, and serving takes only data and models from below:
importing the server pulls in no training code."""

from __future__ import annotations

import subprocess
import sys

TRAINING = ("adapters_zoo.train", "adapters_zoo.loop", "adapters_zoo.train_runtime", "adapters_zoo.train_resume",
            "adapters_zoo.trainer_api", "adapters_zoo.zoo", "fusion.distill")


def test_serving_imports_no_training_module():
    code = ("import sys\nimport serving.engine, serving.generation, serving.app\n"
            f"loaded = [m for m in {TRAINING!r} if m in sys.modules]\n"
            "assert not loaded, f'serving imported training code: {loaded}'\n"
            "assert 'adapters_zoo.models' in sys.modules and 'adapters_zoo.data' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
