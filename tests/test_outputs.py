"""What every write command leaves behind: file modes, the checksum manifest, a valid card, --push-to-hub.

All four model-writing commands run here on tiny models (in-process, through the CLI), and each output
folder is checked the same way: every file has the mode the umask allows (0644 under umask 022, weight
files included, whichever library wrote them), ``moetool verify`` accepts it, and its model card passes
the offline validation. ``--push-to-hub`` runs against a stand-in for ``huggingface_hub.HfApi``: it
records what would be uploaded, and nothing may reach it when a check fails.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from typer.testing import CliRunner

from moetool.cli import app
from moetool.io.manifest import MANIFEST_NAME, verify_folder
from moetool.io.model_card import validate_model_card
from tests.helpers import corpus, make_tokenizer
from tests.tiny import build_tiny

pytestmark = [
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    moe = root / "moe"
    build_tiny("mixtral", moe)
    make_tokenizer(path=moe)
    dense = root / "dense"
    build_tiny("mistral", dense)
    make_tokenizer(path=dense)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in corpus(120)), encoding="utf-8")
    return {"root": root, "moe": moe, "dense": dense, "data": data}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def modes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def check_output(folder: Path, file_mode: int = 0o644, folder_mode: int = 0o755) -> None:
    """Modes, manifest and card of a published output folder."""
    found = modes(folder)
    assert found and all(mode == file_mode for mode in found.values()), found
    assert stat.S_IMODE(folder.stat().st_mode) == folder_mode
    check = verify_folder(folder)
    assert check.ok and check.files == len(found) - 1, check  # the manifest does not list itself
    validate_model_card(folder / "README.md")
    assert "base_model:" not in (folder / "README.md").read_text()  # a local input is not a Hub id


COMMANDS = {
    "quantize": lambda s, out: ["quantize", str(s["moe"]), "-o", str(out), "--method", "rtn", "--bits", "4",
                                "-g", "16"],
    "distill": lambda s, out: ["distill", str(s["moe"]), "-o", str(out), "-d", str(s["data"]), "--steps", "2",
                               "--seq-len", "16", "--batch-size", "4", "--calibration-tokens", "200",
                               "--eval-max-tokens", "200", "--threads", "1"],
    "merge": lambda s, out: ["merge", str(s["moe"]), "-o", str(out), "--num-experts", "2", "--method", "frequency",
                             "-d", str(s["data"]), "--seq-len", "16", "--max-tokens", "400", "--no-eval"],
    "upcycle": lambda s, out: ["upcycle", str(s["dense"]), "-o", str(out), "-e", "4", "-k", "2"],
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_write_command_leaves_readable_verified_output(command, setup, umask_022):
    out = setup["root"] / f"out-{command}"
    result = invoke(*COMMANDS[command](setup, out), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["versions"]["torch"] == torch.__version__ and doc["versions"]["moetool"]
    assert "hub" not in doc
    assert (out / MANIFEST_NAME).is_file()
    check_output(out)
    card = (out / "README.md").read_text()
    # (the exact command is sys.argv, which in-process is pytest's: the CLI tests of each command check it)
    assert "## How it was made" in card and f"- torch: {torch.__version__}" in card


def test_modes_follow_a_stricter_umask(setup):
    out = setup["root"] / "strict"
    old = os.umask(0o027)
    try:
        result = invoke(*COMMANDS["quantize"](setup, out))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    check_output(out, file_mode=0o640, folder_mode=0o750)


# ------------------------------------------------------------------------------------------------ push


class FakeHub:
    """Records create_repo / upload_folder calls the way HfApi would receive them."""

    calls: ClassVar[list[tuple[str, dict]]] = []

    def __init__(self, token=None, **_):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        class RepoUrl(str):
            pass

        url = RepoUrl(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        uploaded = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        FakeHub.calls.append(("upload_folder", {**kwargs, "uploaded": uploaded}))

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"
            pr_url = f"https://huggingface.co/{kwargs['repo_id']}/discussions/1" if kwargs.get("create_pr") else None

        return Commit()


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return FakeHub


def test_push_uploads_the_verified_folder(setup, hub, umask_022):
    out = setup["root"] / "pushed"
    result = invoke(*COMMANDS["quantize"](setup, out), "--push-to-hub", "me/tiny-w4", "--private", "--create-pr",
                    "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["hub"]["repo_id"] == "me/tiny-w4" and doc["hub"]["pr_url"].endswith("/discussions/1")
    (create, create_args), (upload, upload_args) = hub.calls
    assert create == "create_repo" and create_args["private"] is True and create_args["exist_ok"] is True
    assert upload == "upload_folder" and upload_args["create_pr"] is True
    assert Path(upload_args["folder_path"]) == out
    assert MANIFEST_NAME in upload_args["uploaded"] and "model.safetensors" in upload_args["uploaded"]
    assert sorted(doc["hub"]["files"]) == upload_args["uploaded"]


def test_nothing_is_uploaded_when_the_command_verification_fails(setup, hub, monkeypatch):
    from moetool.quantize import verify as qverify

    def broken(*_args, **_kwargs):
        raise qverify.VerificationError("2 routed-expert tensors are not quantized", code="EXPERTS_NOT_QUANTIZED")

    monkeypatch.setattr(qverify, "check_coverage", broken)
    out = setup["root"] / "not-pushed"
    result = invoke(*COMMANDS["quantize"](setup, out), "--push-to-hub", "me/tiny-w4")
    assert result.exit_code == 1, result.output
    assert "not quantized" in result.output
    assert hub.calls == [] and not out.exists()


def test_nothing_is_uploaded_when_the_folder_changed_after_writing(setup, hub, tmp_path):
    from moetool.io.hub import HubPushError, push_folder

    out = setup["root"] / "out-upcycle"  # written by the parametrized test above, or now
    if not out.exists():
        assert invoke(*COMMANDS["upcycle"](setup, out)).exit_code == 0
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(HubPushError) as info:
        push_folder(copy, "me/tiny-moe", api=FakeHub())
    assert info.value.code == "PUSH_REFUSED" and "model.safetensors" in info.value.message
    assert hub.calls == []


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--push-to-hub", "not a repo"], 2, "not a Hub repo id"),
        (["--push-to-hub", "noowner"], 2, "has no owner"),
        (["--push-to-hub", "me/x", "--offline"], 2, "offline"),
        (["--private"], 2, "--private only applies with --push-to-hub"),
    ],
)
def test_push_options_are_checked_before_any_work(setup, hub, args, code, needle):
    out = setup["root"] / "never"
    result = invoke(*COMMANDS["quantize"](setup, out), *args)
    assert result.exit_code == code, result.output
    assert needle in result.output
    assert hub.calls == [] and not out.exists()


def test_push_without_a_token_fails_before_any_work(setup, hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))  # no token saved by `hf auth login` either
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = setup["root"] / "never"
    result = invoke(*COMMANDS["quantize"](setup, out), "--push-to-hub", "me/x")
    assert result.exit_code == 1 and "needs a Hub token" in result.output
    assert hub.calls == [] and not out.exists()


def test_upcycle_dry_run_cannot_push(setup, hub):
    result = invoke(*COMMANDS["upcycle"](setup, setup["root"] / "never"), "--dry-run", "--push-to-hub", "me/x")
    assert result.exit_code == 2 and "--dry-run" in result.output


def test_export_pushes_the_verified_conversion(setup, hub, umask_022):
    """`moetool export --push-to-hub` uploads the converted folder once its checks passed."""
    source = setup["root"] / "w4-moetool"
    made = invoke("quantize", str(setup["moe"]), "-o", str(source), "--method", "rtn", "--bits", "4", "-g", "0",
                  "--sym", "--format", "moetool")  # fmt: skip
    assert made.exit_code == 0, made.output
    hub.calls.clear()
    out = setup["root"] / "w4-ct"
    result = invoke("export", str(source), "-o", str(out), "--push-to-hub", "me/tiny-w4-ct", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["hub"]["repo_id"] == "me/tiny-w4-ct"
    assert [call for call, _ in hub.calls] == ["create_repo", "upload_folder"]
    assert Path(hub.calls[1][1]["folder_path"]) == out and MANIFEST_NAME in hub.calls[1][1]["uploaded"]
    check_output(out)


def test_export_push_options_are_checked_before_any_work(setup, hub):
    out = setup["root"] / "never-exported"
    result = invoke("export", str(setup["moe"]), "-o", str(out), "--push-to-hub", "not a repo")
    assert result.exit_code == 2, result.output
    assert hub.calls == [] and not out.exists()
