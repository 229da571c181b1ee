"""Fetch transformers' common model test-suite (the sdist's `tests/`) for the installed transformers version.

    python scripts/fetch_transformers_tests.py [--dest third_party/transformers_tests] [--force]

Downloads `transformers==<installed>` as an sdist with pip, extracts only its `tests/` tree into
`<dest>/tests/` and writes the three modules the mixins import but the sdist does not ship, as small
stand-ins. Does nothing when `<dest>` already holds the tests of the installed version. The test-suite
(`tests/test_transformers_common.py`) never downloads: it only reads what this script leaves behind.
"""

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = ROOT / "third_party" / "transformers_tests"
VERSION_FILE = "TRANSFORMERS_VERSION"

# The sdist's tests import these modules, which it does not include; nothing in them matters to vision encoders.
STAND_INS = {
    "exporters/test_export.py": '''\
"""Stand-in written by scripts/fetch_transformers_tests.py: the sdist lacks the exporter tests."""


class ExportTesterMixin:
    """Empty: the export tests are not part of the transformers sdist."""
''',
    "generation/test_utils.py": '''\
"""Stand-in written by scripts/fetch_transformers_tests.py: the sdist lacks the generation tests."""


class GenerationTesterMixin:
    """Empty: generation does not apply to encoders, and its tests are not part of the transformers sdist."""
''',
    "utils/test_configuration_utils.py": '''\
"""Stand-in written by scripts/fetch_transformers_tests.py: the sdist lacks tests/utils.

`ConfigTester.check_config_arguments_init` builds a config from these kwargs and checks that every one of them
comes back as given, so they are non-default values of fields every PreTrainedConfig has.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "is_encoder_decoder": True,
    "architectures": ["BertModel"],
    "finetuning_task": "translation",
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
''',
}


def installed_version_present(dest: Path, version: str) -> bool:
    """True when `dest` already holds the extracted tests of `version`."""
    stamp = dest / VERSION_FILE
    has_suite = (dest / "tests" / "test_modeling_common.py").is_file()
    return has_suite and stamp.is_file() and stamp.read_text().strip() == version


def download_sdist(version: str, workdir: Path) -> Path:
    """`pip download` the transformers sdist of `version` into `workdir` and return its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
        f"transformers=={version}", "--dest", str(workdir),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    archives = sorted(workdir.glob(f"transformers-{version}.tar.gz"))
    if not archives:
        raise SystemExit(f"pip did not leave transformers-{version}.tar.gz in {workdir}")
    return archives[0]


def extract_tests(archive: Path, target: Path) -> int:
    """Extract the archive's top-level `tests/` tree into `target`; returns the number of files written."""
    count = 0
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) < 3 or parts[1] != "tests" or not member.isfile():
                continue
            relative = Path(*parts[2:])
            if ".." in relative.parts:
                continue
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as source, open(path, "wb") as sink:
                shutil.copyfileobj(source, sink)
            count += 1
    return count


def write_stand_ins(tests_dir: Path) -> None:
    """Write the modules the mixins import but the sdist lacks (never over a real one), with package markers."""
    for relative, text in STAND_INS.items():
        path = tests_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(text)
    for package in [tests_dir, *(tests_dir / Path(r).parent for r in STAND_INS)]:
        (package / "__init__.py").touch()


def fetch(dest: Path, force: bool = False) -> Path:
    """Make `dest/tests` the test-suite of the installed transformers; returns `dest`."""
    version = transformers.__version__
    if not force and installed_version_present(dest, version):
        print(f"transformers {version} tests already in {dest}")
        return dest
    with tempfile.TemporaryDirectory(prefix="transformers-sdist-") as tmp:
        archive = download_sdist(version, Path(tmp))
        staging = Path(tmp) / "tests"
        count = extract_tests(archive, staging)
        if not (staging / "test_modeling_common.py").is_file():
            raise SystemExit(f"{archive.name} has no tests/test_modeling_common.py")
        write_stand_ins(staging)
        shutil.rmtree(dest / "tests", ignore_errors=True)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest / "tests")
    (dest / VERSION_FILE).write_text(version + "\n")
    print(f"extracted {count} files of transformers {version} tests into {dest / 'tests'}")
    return dest


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="folder that receives tests/ (gitignored)")
    parser.add_argument("--force", action="store_true", help="download again even if present")
    args = parser.parse_args(argv)
    fetch(args.dest.resolve(), force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
