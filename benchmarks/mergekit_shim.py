"""Run mergekit's ``mergekit-yaml`` command line (arguments passed through) after adamerge_fast's torchvision
workaround: ``.venv-mergekit/bin/python benchmarks/mergekit_shim.py CONFIG.yml OUT_DIR [options]``.

Under the project's torch pin a torchvision build that does not match torch fails to import (``torchvision::nms
does not exist``), and transformers imports torchvision when it is installed; the workaround of
``adamerge_fast._compat`` (read from this checkout by its path, so the package need not be installed in
mergekit's environment) defines the missing schemas first.
"""

import importlib.util
import sys
from pathlib import Path

_COMPAT = Path(__file__).resolve().parents[1] / "adamerge_fast" / "_compat.py"


def main() -> int:
    spec = importlib.util.spec_from_file_location("_adamerge_fast_compat", _COMPAT)
    compat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compat)
    compat.import_torchvision_safely()
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    return int(mergekit_yaml(standalone_mode=True) or 0)


if __name__ == "__main__":
    sys.exit(main())
