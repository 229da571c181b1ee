"""`vitreg publish`: validation of the folder, the dry-run listing, the offline and no-token refusals, the batch
form, and the upload through huggingface_hub's real HfApi client with only its HTTP transport stood in for."""

import base64
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from conftest import tiny_config
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import _http as hub_http

from vitreg.cli import main as vitreg_main
from vitreg.core.errors import UserError
from vitreg.core.folders import MARKER
from vitreg.core.provenance import PROVENANCE_FILE, Provenance
from vitreg.model_cards import publish, save_model_folder
from vitreg.modeling_vitreg import ViTRegForImageClassification, ViTRegModel

PROVENANCE = Provenance(
    kind="converted",
    source_file="my_vit_reg.pth",
    source_sha256="ab12" * 16,
    source_format="timm",
    vitreg_version="0.1.0",
)


@pytest.fixture
def folder(tmp_path) -> Path:
    return save_model_folder(ViTRegModel(tiny_config()).eval(), tmp_path / "models" / "tiny-reg4", PROVENANCE)


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No token anywhere: neither in the environment nor in a stored login."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))


class FakeHub:
    """The Hub's HTTP API as an httpx2 MockTransport: records every request, answers like the real endpoints."""

    def __init__(self):
        self.requests: list[httpx2.Request] = []

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/api/repos/create":
            body = json.loads(request.content)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return httpx2.Response(200, json={"files": modes})
        if "/branch/" in path:
            return httpx2.Response(200, json={})
        if "/commit/" in path:
            repo_id, revision = path.removeprefix("/api/models/").split("/commit/")
            url = f"https://huggingface.co/{repo_id}/commit/{'ab' * 20}"  # the Hub names the branch nowhere here
            return httpx2.Response(200, json={"commitUrl": url, "commitOid": "ab" * 20})
        return httpx2.Response(404, json={"error": f"no fake for {request.method} {path}"})

    def paths(self) -> list[str]:
        """The API calls made, less the registry of AI agents huggingface_hub fetches for its user agent."""
        return [f"{r.method} {r.url.path}" for r in self.requests if r.url.path != "/api/agent-harnesses"]

    def commit(self) -> tuple[dict, dict[str, bytes]]:
        """The header and the files ({path: bytes}) of the one commit request."""
        (request,) = [request for request in self.requests if "/commit/" in request.url.path]
        lines = [json.loads(line) for line in request.content.decode().splitlines()]
        files = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines[1:]}
        assert lines[0]["key"] == "header" and all(line["key"] == "file" for line in lines[1:])
        return lines[0]["value"], files


@pytest.fixture
def fake_hub():
    """huggingface_hub's own client (HfApi, get_session) talking to FakeHub instead of the network."""
    hub = FakeHub()
    hub_http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub.handle)))
    yield hub
    hub_http.set_client_factory(hub_http.default_client_factory)


@pytest.fixture
def online(monkeypatch):
    """Lift HF_HUB_OFFLINE (set for every test by conftest) where the Hub is the fake one."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_dry_run_lists_every_file_and_changes_nothing(folder, no_token, fake_hub, capsys):
    """Offline (conftest sets HF_HUB_OFFLINE=1), without a token, and without a single request."""
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert vitreg_main(["publish", str(folder), "--repo-id", "vitreg-test/tiny-reg4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = [re.match(r"^\s+([\d,]+)  (\S+)$", line) for line in out.splitlines()]
    listed = {row[2]: int(row[1].replace(",", "")) for row in rows if row}
    assert MARKER in before  # vitreg's output marker: in the folder, never in the repo
    code = {name for name in before if name.endswith(".py")}  # the remote code: the model file and its siblings
    assert {"configuration_vitreg.py", "modeling_vitreg.py"} <= code
    shipped = {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", PROVENANCE_FILE, *code}
    assert set(listed) == set(before) - {MARKER} == shipped
    for name, data in before.items():
        if name not in ("README.md", MARKER):
            assert listed[name] == len(data), name
    card = publish.build_card(folder, PROVENANCE, "vitreg-test/tiny-reg4")
    assert listed["README.md"] == len(str(card).encode())  # the card as it would be uploaded, repo id inside
    assert f"would upload {len(listed)} files" in out
    assert "Upload ViTReg conversion of my_vit_reg.pth (sha256 ab12ab12ab12)" in out
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # nothing rewritten
    assert fake_hub.requests == []  # no network


def test_offline_refusal_is_one_line_without_traceback(folder, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_real_token"}
    done = subprocess.run(
        [sys.executable, "-m", "vitreg", "publish", str(folder), "--repo-id", "vitreg-test/tiny-reg4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "vitreg publish: error: the Hugging Face Hub is out of reach: HF_HUB_OFFLINE is set (unset it to publish)"
    ]


def test_no_token_refusal(folder, no_token, fake_hub, online, capsys):
    assert vitreg_main(["publish", str(folder), "--repo-id", "vitreg-test/tiny-reg4"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no Hugging Face token" in line
    assert fake_hub.requests == []


def test_upload_through_the_real_client(folder, fake_hub, online, monkeypatch, capsys):
    validated = []
    monkeypatch.setattr(publish, "check_loads", validated.extend)  # the remote-code load is tested above
    args = ["publish", str(folder), "--repo-id", "vitreg-test/tiny-reg4", "--private", "--token", "hf_test_token"]
    assert vitreg_main(args) == 0
    assert validated == [folder]
    assert fake_hub.paths() == [
        "POST /api/repos/create",
        "POST /api/validate-yaml",
        "POST /api/models/vitreg-test/tiny-reg4/preupload/main",
        "POST /api/models/vitreg-test/tiny-reg4/commit/main",
    ]
    calls = [request for request in fake_hub.requests if request.method == "POST"]
    assert all(request.headers["authorization"] == "Bearer hf_test_token" for request in calls)
    create = json.loads(calls[0].content)
    assert (create["organization"], create["name"], create["visibility"]) == ("vitreg-test", "tiny-reg4", "private")
    header, files = fake_hub.commit()
    assert header["summary"] == "Upload ViTReg conversion of my_vit_reg.pth (sha256 ab12ab12ab12)"
    assert set(files) == {path.name for path in folder.iterdir()} - {MARKER} and (folder / MARKER).is_file()
    for name in files:
        assert files[name] == (folder / name).read_bytes(), name
    card = ModelCard.load(folder / "README.md")  # the published card names its repo
    assert card.text.lstrip().startswith("# tiny-reg4") and 'repo_id = "vitreg-test/tiny-reg4"' in card.text
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert f"commit: https://huggingface.co/vitreg-test/tiny-reg4/commit/{'ab' * 20}" in capsys.readouterr().out


def test_upload_to_a_branch(folder, fake_hub, online):
    result = publish.publish_folder(folder, "vitreg-test/tiny-reg4", branch="v1", token="hf_x", validate=False)
    assert fake_hub.paths() == [
        "POST /api/repos/create",
        "POST /api/models/vitreg-test/tiny-reg4/branch/v1",
        "POST /api/validate-yaml",
        "POST /api/models/vitreg-test/tiny-reg4/preupload/v1",
        "POST /api/models/vitreg-test/tiny-reg4/commit/v1",
    ]
    assert "visibility" not in json.loads(fake_hub.requests[-5].content)  # not --private: the account's default
    assert result.commit_url == f"https://huggingface.co/vitreg-test/tiny-reg4/commit/{'ab' * 20}"


def refuse(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(403, json={"error": "You don't have the rights"})


def unreachable(request: httpx2.Request) -> httpx2.Response:
    raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)


@pytest.mark.parametrize("answer, reason", [(refuse, "403"), (unreachable, "name resolution")])
def test_hub_errors_become_one_line(folder, fake_hub, online, answer, reason):
    fake_hub.handle = answer
    with pytest.raises(UserError, match=f"^publishing .* to vitreg-test/tiny-reg4 failed: .*{reason}") as error:
        publish.publish_folder(folder, "vitreg-test/tiny-reg4", token="hf_x", validate=False)
    assert "\n" not in str(error.value)


def break_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def break_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "vitreg", ')


def break_card(folder: Path) -> None:
    (folder / "README.md").unlink()


def plain_readme(folder: Path) -> None:
    (folder / "README.md").write_text("# my model\n\nNo metadata here.\n")


def wrong_pipeline_tag(folder: Path) -> None:
    card = ModelCard.load(folder / "README.md")
    card.data.pipeline_tag = "image-classification"
    card.save(folder / "README.md")


def no_remote_code(folder: Path) -> None:
    (folder / "modeling_vitreg.py").unlink()


def no_provenance(folder: Path) -> None:
    (folder / PROVENANCE_FILE).unlink()


@pytest.mark.parametrize(
    "damage, reason",
    [
        (break_weights, "has no weights"),
        (break_config, "config.json is not valid JSON"),
        (break_card, "has no model card"),
        (plain_readme, "library_name is None"),
        (wrong_pipeline_tag, "pipeline_tag is 'image-classification', the model needs 'image-feature-extraction'"),
        (no_remote_code, "has no modeling_vitreg.py"),
        (no_provenance, f"has no {PROVENANCE_FILE}"),
    ],
)
def test_broken_folders_are_refused_with_one_line(folder, damage, reason):
    damage(folder)
    with pytest.raises(UserError) as error:
        publish.publish_folder(folder, "vitreg-test/tiny-reg4", dry_run=True)
    assert reason in str(error.value) and "\n" not in str(error.value)


def test_folders_that_only_fail_as_remote_code_are_refused(tmp_path):
    """The fresh-process load runs the folder's own code and weights: the installed package cannot mask them."""
    code_broken = save_model_folder(ViTRegModel(tiny_config()), tmp_path / "code", PROVENANCE)
    with open(code_broken / "modeling_vitreg.py", "a") as handle:
        handle.write('\nraise RuntimeError("shipped code is broken")\n')
    weights_for_another_model = save_model_folder(ViTRegModel(tiny_config()), tmp_path / "weights", PROVENANCE)
    other = save_model_folder(ViTRegModel(tiny_config(hidden_size=64)), tmp_path / "other", PROVENANCE)
    (weights_for_another_model / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())

    good = save_model_folder(ViTRegModel(tiny_config()), tmp_path / "good", PROVENANCE)
    with pytest.raises(UserError, match="do not load as remote code") as error:
        publish.validate_folders([code_broken, good, weights_for_another_model])  # one fresh process for all
    message = str(error.value)
    assert "\n" not in message and "2 of 3 folders" in message
    assert f"{code_broken.resolve()}: RuntimeError: shipped code is broken" in message
    reason = r"ValueError: weights do not match the model: \d+ mismatched keys \(e\.g\. \('embeddings"
    assert re.search(re.escape(f"{weights_for_another_model.resolve()}: ") + reason, message)
    assert str(good.resolve()) not in message


def test_batch_dry_run_publishes_every_folder_under_one_org(tmp_path, no_token, fake_hub, capsys):
    root = tmp_path / "converted"
    save_model_folder(ViTRegModel(tiny_config()), root / "tiny-reg4", PROVENANCE)
    classifier = ViTRegForImageClassification(tiny_config(num_labels=3))
    with_head = dataclasses.replace(PROVENANCE, head_file="head.pth")
    save_model_folder(classifier, root / "heads" / "tiny-reg4-head", with_head)
    (root / "notes").mkdir()
    (root / "notes" / "config.json").write_text('{"model_type": "vit"}')  # not a ViTReg folder: skipped

    assert vitreg_main(["publish", str(root), "--batch", "--org", "vitreg-test", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("heads/tiny-reg4-head", "tiny-reg4"):
        files = len([path for path in (root / name).iterdir() if path.name != MARKER])
        assert f"{root / name} -> vitreg-test/{name.split('/')[-1]}: would upload {files} files" in out
    assert "Upload ViTReg conversion of my_vit_reg.pth + head.pth" in out
    assert fake_hub.requests == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", "x"], "--batch needs --org ORG"),
        (["somewhere"], "give MODEL_DIR and --repo-id"),
        (["somewhere", "--repo-id", "not a repo"], "invalid repo id 'not a repo'"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    assert vitreg_main(["publish", *args, "--dry-run"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line
