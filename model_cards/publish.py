"""`vitreg publish`: validate ViTReg folders, write the repo id into their cards, upload each in one Hub commit."""

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from vitreg.core.errors import UserError
from vitreg.core.flags import spellings
from vitreg.core.folders import MARKER
from vitreg.core.provenance import PROVENANCE_FILE, Provenance

from .card import build_card, read_provenance

logger = logging.getLogger(__name__)  # `vitreg publish` shows these steps on stderr as they happen

LOAD_CHECK = Path(__file__).with_name("load_check.py")
# Never part of a model repo: vitreg's own output marker (named, though ".*" covers it), hidden files, caches.
IGNORE_PATTERNS = [MARKER, ".*", "**/.*", "__pycache__", "**/__pycache__/**", "*.pyc"]
REQUIRED_FILES = ("config.json", "preprocessor_config.json", "configuration_vitreg.py", "modeling_vitreg.py")
PIPELINE_TAGS = ("image-feature-extraction", "image-classification")


@dataclass
class PublishResult:
    """What `publish_folder` did (or, with `dry_run`, would do) for one folder."""

    folder: Path
    repo_id: str
    files: list[tuple[str, int]] = field(default_factory=list)  # (path in the repo, size in bytes)
    commit_message: str = ""
    commit_url: str | None = None


def upload_files(folder: Path) -> list[tuple[str, int]]:
    """Every file of `folder` that an upload sends, with its size, filtered like `upload_folder` filters."""
    paths = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*")) if path.is_file()}
    kept = filter_repo_objects(list(paths), ignore_patterns=IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS)
    return [(name, paths[name].stat().st_size) for name in kept]


def read_config(folder: Path) -> dict:
    """config.json of a ViTReg folder, refusing anything else with a one-line reason."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} has no config.json: not a saved model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{folder}/config.json is not valid JSON ({error})") from None
    if config.get("model_type") != "vitreg":
        raise UserError(f"{folder} holds a {config.get('model_type')!r} model, not a ViTReg one")
    return config


def check_files(folder: Path, config: dict) -> None:
    """Refuse a folder without weights, remote code, processor or provenance."""
    for name in REQUIRED_FILES + (PROVENANCE_FILE,):
        if not (folder / name).is_file():
            raise UserError(f"{folder} has no {name}: re-save it with ViTReg (vitreg.model_cards.save_model_folder)")
    if "AutoConfig" not in config.get("auto_map", {}):
        raise UserError(f"{folder}/config.json has no auto_map: it would not load as remote code")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(shard for shard in shards if not (folder / shard).is_file())
        if missing or not shards:
            raise UserError(f"{folder} is missing weight shards: {', '.join(missing) or 'the index lists none'}")
    elif not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder} has no weights (model.safetensors)")


def check_card(folder: Path, config: dict) -> ModelCard:
    """Refuse a folder whose README.md lacks a model card with the metadata the Hub and users rely on."""
    if not (folder / "README.md").is_file():
        raise UserError(f"{folder} has no model card (README.md)")
    try:
        card = ModelCard.load(folder / "README.md")
    except Exception as error:  # huggingface_hub raises ValueError or yaml errors for a broken header
        raise UserError(f"{folder}/README.md has no readable card metadata ({error})") from None
    data = card.data
    is_classifier = (config.get("architectures") or [""])[0].endswith("ForImageClassification")
    expected_tag = PIPELINE_TAGS[1] if is_classifier else PIPELINE_TAGS[0]
    problems = []
    if not data.license:
        problems.append("no license")
    elif data.license == "other" and not (data.license_name and data.license_link):
        problems.append("license 'other' without license_name and license_link")
    if data.library_name != "transformers":
        problems.append(f"library_name is {data.library_name!r}, not 'transformers'")
    if data.pipeline_tag != expected_tag:
        problems.append(f"pipeline_tag is {data.pipeline_tag!r}, the model needs {expected_tag!r}")
    if not {"vitreg", "registers"} <= set(data.tags or []):
        problems.append("tags lack 'vitreg' and 'registers'")
    if problems:
        raise UserError(f"{folder}/README.md card metadata: {'; '.join(problems)}")
    return card


def check_loads(folders: list[Path], timeout: float = 1800) -> list[dict]:
    """Load every folder as remote code in one fresh interpreter without the vitreg package; refuse on failure."""
    names = folders[0] if len(folders) == 1 else f"{len(folders)} folders"
    logger.info(f"loading {names} as remote code in a fresh interpreter, as a Hub user would (takes a few seconds)")
    with tempfile.TemporaryDirectory(prefix="vitreg-load-check-") as modules:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": modules, "TRANSFORMERS_VERBOSITY": "error"}
        env["TQDM_DISABLE"] = "1"
        command = [sys.executable, "-I", str(LOAD_CHECK), *(str(folder.resolve()) for folder in folders)]
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"loading {len(folders)} folder(s) as remote code took over {timeout:.0f} s") from None
    if done.returncode != 0:
        failures = [line.removeprefix("FAILED ") for line in done.stderr.splitlines() if line.startswith("FAILED ")]
        failures = failures or (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1:]
        raise UserError(
            f"{len(failures)} of {len(folders)} folders do not load as remote code in a fresh interpreter: "
            + "; ".join(failures)
        )
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def validate_folders(folders: list[Path]) -> list[dict]:
    """All checks on every folder: files, card metadata, then a remote-code load in a fresh process."""
    for folder in folders:
        logger.info(f"validating {folder}: files, weights and card metadata")
        config = read_config(folder)
        check_files(folder, config)
        check_card(folder, config)
    return check_loads(folders)


def check_repo_id(repo_id: str) -> str:
    """Refuse a repo id that is not ORG/NAME by the Hub's own rules."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"invalid repo id {repo_id!r}: {str(error).splitlines()[0]}") from None
    if "/" not in repo_id:
        raise UserError(f"invalid repo id {repo_id!r}: expected ORG/NAME")
    return repo_id


def hub_token(token: str | None) -> str:
    """The token to publish with; refuses offline mode or a missing token, before any network call."""
    if constants.HF_HUB_OFFLINE:
        raise UserError("the Hugging Face Hub is out of reach: HF_HUB_OFFLINE is set (unset it to publish)")
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`")
    return token


def commit_message(provenance: Provenance) -> str:
    """A commit title naming where the weights come from."""
    if provenance.kind == "converted":
        source = provenance.official_name or provenance.source_file or "a checkpoint"
        sha = provenance.source_sha256 or ""
        head = f" + {provenance.head_file}" if provenance.head_file else ""
        return f"Upload ViTReg conversion of {source}{head}" + (f" (sha256 {sha[:12]})" if sha else "")
    if provenance.kind == "trained":
        return (
            f"Upload ViTReg model trained with {provenance.objective or 'vitreg'} "
            f"({provenance.config_file or 'recipe'}, {provenance.steps or '?'} steps)"
        )
    return "Upload randomly initialised ViTReg model"


def publish_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    validate: bool = True,
) -> PublishResult:
    """Validate `folder`, write `repo_id` into its card and upload it in one commit to `branch` (default: main,
    created if missing), or, with `dry_run`, list what would go up."""
    folder = Path(folder)
    check_repo_id(repo_id)
    token = None if dry_run else hub_token(token)
    if validate:
        validate_folders([folder])
    provenance = read_provenance(folder)
    if provenance is None:
        raise UserError(f"{folder} has no {PROVENANCE_FILE}: re-save it with ViTReg")
    logger.info(f"rendering the model card of {folder} for {repo_id}")
    card = build_card(folder, provenance, repo_id)
    result = PublishResult(folder, repo_id, commit_message=commit_message(provenance))
    if dry_run:  # the folder stays as it is: list what would go up, the card at its new size
        files = [(name, size) for name, size in upload_files(folder) if name != "README.md"]
        result.files = sorted(files + [("README.md", len(str(card).encode()))])
        return result
    card.save(folder / "README.md")
    result.files = upload_files(folder)
    logger.info(f"uploading {len(result.files)} files of {folder} to {repo_id}")
    result.commit_url = upload(folder, repo_id, result.commit_message, private, branch, token)
    return result


def upload(folder: Path, repo_id: str, message: str, private: bool, branch: str | None, token: str) -> str:
    """create_repo + upload_folder; Hub and network errors become one-line UserErrors."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True)  # None: the account default
        if branch and not branch.startswith("refs/"):
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=branch,
            commit_message=message,
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    # huggingface_hub's own HTTP error base (httpx's or httpx2's, whichever its release uses) covers HfHubHTTPError.
    except (HTTPError, OfflineModeIsEnabled, OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"publishing {folder} to {repo_id} failed: {reason}") from None
    return info.commit_url


def find_model_folders(root: Path) -> list[Path]:
    """Every ViTReg folder below `root` (a folder whose config.json has model_type vitreg), sorted."""
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    found = []
    for config in sorted(root.rglob("config.json")):
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if model_type == "vitreg" and not any(part.startswith(".") for part in config.relative_to(root).parts):
            found.append(config.parent)
    if not found:
        raise UserError(f"no ViTReg folder (config.json with model_type 'vitreg') below {root}")
    return found


def publish_batch(
    root: str | Path,
    org: str,
    *,
    private: bool = False,
    branch: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
) -> list[PublishResult]:
    """Publish every ViTReg folder below `root` as ORG/<folder name>, after validating them all."""
    folders = find_model_folders(Path(root))
    logger.info(f"found {len(folders)} ViTReg folder(s) below {root}")
    repo_ids = [check_repo_id(f"{org}/{folder.name}") for folder in folders]
    token = None if dry_run else hub_token(token)
    validate_folders(folders)  # all of them before the first upload: a batch goes up whole or not at all
    return [
        publish_folder(folder, repo_id, private=private, branch=branch, token=token, dry_run=dry_run, validate=False)
        for folder, repo_id in zip(folders, repo_ids)
    ]


def format_size(size: int) -> str:
    """Bytes as a short human-readable size."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


def report(result: PublishResult, dry_run: bool) -> None:
    """Print the files of one publish, with sizes."""
    verb = "would upload" if dry_run else "uploaded"
    total = sum(size for _, size in result.files)
    print(f"{result.folder} -> {result.repo_id}: {verb} {len(result.files)} files, {format_size(total)}")
    for name, size in result.files:
        print(f"  {size:>14,d}  {name}")
    print(f"  commit message: {result.commit_message}")
    if result.commit_url:
        print(f"  commit: {result.commit_url}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `vitreg publish`."""
    parser.add_argument(
        "model_dir",
        nargs="?",
        type=Path,
        metavar="MODEL_DIR",
        help="a ViTReg folder (written by convert or pretrain); with --batch, a folder of them",
    )
    parser.add_argument(*spellings("--repo-id"), help="target Hub repository, ORG/NAME")
    parser.add_argument(
        *spellings("--batch"),
        action="store_true",
        help="publish every ViTReg folder below MODEL_DIR, each to ORG/<folder name> (needs --org)",
    )
    parser.add_argument(
        *spellings("--org"), help="with --batch: the organisation; each folder goes to ORG/<folder name>"
    )
    parser.add_argument(*spellings("--private"), action="store_true", help="create the repository as private")
    parser.add_argument(
        *spellings("--branch"), help="branch of the Hub repository to commit to (created if missing; default: main)"
    )
    # Elsewhere --revision names the revision of a source model: here it is refused, pointing at --branch.
    parser.add_argument(*spellings("--revision"), help=argparse.SUPPRESS)
    parser.add_argument(*spellings("--token"), help="Hugging Face token (default: HF_TOKEN or the stored login)")
    parser.add_argument(
        *spellings("--dry-run"), action="store_true", help="validate and list the files; no network, no token"
    )


def run(args: argparse.Namespace) -> int:
    """Run `vitreg publish`."""
    if args.revision is not None:
        raise UserError(
            f"publish has no --revision (elsewhere it names a source model's revision): to commit to a branch, "
            f"pass --branch {args.revision}"
        )
    if args.model_dir is None:
        raise UserError("give MODEL_DIR and --repo-id ORG/NAME (or MODEL_DIR --batch --org ORG)")
    if args.batch:
        if args.repo_id:
            raise UserError("--batch names each repository ORG/<folder name>: give --org ORG, not --repo-id")
        if not args.org:
            raise UserError("--batch needs --org ORG")
        results = publish_batch(
            args.model_dir, args.org, private=args.private, branch=args.branch, token=args.token, dry_run=args.dry_run
        )
    else:
        if not args.repo_id:
            raise UserError("give MODEL_DIR and --repo-id ORG/NAME (or MODEL_DIR --batch --org ORG)")
        if args.org:
            raise UserError("--org goes with --batch; give the full --repo-id ORG/NAME")
        result = publish_folder(
            args.model_dir,
            args.repo_id,
            private=args.private,
            branch=args.branch,
            token=args.token,
            dry_run=args.dry_run,
        )
        results = [result]
    for result in results:
        report(result, args.dry_run)
    if args.dry_run:
        print("dry run: nothing was uploaded")
    return 0
