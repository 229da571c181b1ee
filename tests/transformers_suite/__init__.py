"""transformers' own common model test-suite (from its sdist), wired to vision encoders as to in-tree models.

`scripts/fetch_transformers_tests.py` extracts the suite into `third_party/transformers_tests/tests/`; this
package puts it on `sys.path` (as the package `tests`, which its relative imports need) and fails loudly when
it is missing: a test-suite that silently skips itself proves nothing.
"""

import sys
from pathlib import Path

import transformers

ROOT = Path(__file__).resolve().parents[2]
SUITE_ROOT = ROOT / "third_party" / "transformers_tests"
FETCH_COMMAND = "python scripts/fetch_transformers_tests.py"


def add_suite_to_path() -> Path:
    """Put the extracted suite on `sys.path`, or raise with the command that fetches it."""
    tests_dir = SUITE_ROOT / "tests"
    if not (tests_dir / "test_modeling_common.py").is_file():
        raise RuntimeError(
            f"transformers' common test-suite is missing from {tests_dir}: run `{FETCH_COMMAND}` first "
            "(it downloads the transformers sdist once; the tests themselves never download)"
        )
    stamp = SUITE_ROOT / "TRANSFORMERS_VERSION"
    version = stamp.read_text().strip() if stamp.is_file() else "unknown"
    if version != transformers.__version__:
        raise RuntimeError(
            f"{tests_dir} holds the tests of transformers {version}, but {transformers.__version__} is installed: "
            f"run `{FETCH_COMMAND}` again"
        )
    loaded = sys.modules.get("tests")
    if loaded is not None and Path(getattr(loaded, "__file__", None) or "").parent != tests_dir:
        raise RuntimeError(f"another package named `tests` is already imported ({loaded}); cannot load the suite")
    if str(SUITE_ROOT) not in sys.path:
        sys.path.insert(0, str(SUITE_ROOT))
    return tests_dir
