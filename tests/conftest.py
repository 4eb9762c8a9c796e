import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from fixtures_models import FAMILY_NAMES, make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> (folder, fp32 transformers model) for every supported family, built once per session."""
    root = tmp_path_factory.mktemp("ckpt")
    return {fam: make_checkpoint(fam, root / fam) for fam in FAMILY_NAMES}
