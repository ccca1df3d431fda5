"""The authors' published checkpoints (issue 26): exact parity with the logits the authors' code
computes for the fixtures in tests/fixtures/authors/ (copied from
shared/fixtures/authors-checkpoints, see its README), the restricted unpickler, the reverse
layout and its round trip, the import/export verbs.

Each parity test names the max abs difference measured when it was written (fp32, every logit
column but the mask token's) and asserts it stays below 1e-5."""

from __future__ import annotations

import json
import os
import pickletools
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from esolm.checkpoint import load_run, save_model
from esolm.cli import main
from esolm.model.backbone import Backbone
from esolm.model.masks import AttentionMask, clean_mask, two_stream_mask
from esolm.published import identity_modulation, names, to_dit, to_esolm
from esolm.published_io import chars_tokenizer, export_authors, import_model, read_source
from esolm.safe_pickle import UnsafePickle, restricted_load
from tests.conftest import sharp_model

FIX = Path(__file__).parent / "fixtures" / "authors"
MASK = 23
GOLDEN = load_file(str(FIX / "golden.safetensors"))
TOL = 1e-5


def _model(source: str, **kw) -> Backbone:
    imp = read_source(FIX / source, **kw)
    model = Backbone(imp.config)
    model.load_state_dict(imp.ema_weights if imp.ema_weights is not None else imp.weights)
    return model.eval()


def _max_diff(logits: torch.Tensor, golden: torch.Tensor) -> float:
    keep = [i for i in range(golden.shape[-1]) if i != MASK]
    return float((logits[..., keep] - golden[..., keep]).abs().max())


def _diffusion(model: Backbone) -> torch.Tensor:
    """Eso-LM (B) diffusion pass: z sorted clean first, rotary at the original positions, causal."""
    order, z_sorted = GOLDEN["eso_b.order"], GOLDEN["eso_b.diffusion.z_sorted"]
    assert torch.equal(GOLDEN["z"].gather(1, order), z_sorted)
    with torch.no_grad():
        return model(z_sorted, order, clean_mask(model.config))


def test_eso_b_hf_folder_diffusion_pass_matches_the_authors():
    """max abs difference 8.3e-7"""
    assert _max_diff(_diffusion(_model("eso_b_hf")), GOLDEN["eso_b.diffusion.logits"]) < TOL


def test_eso_b_hf_folder_sequential_pass_matches_the_authors():
    """The 2L pass [z ; x] (permuted) with the two-stream causal mask; max abs difference 6.6e-7"""
    model = _model("eso_b_hf")
    order, z, x = (GOLDEN[f"eso_b.sequential.{k}"] for k in ("order", "z_sorted", "x_sorted"))
    mask = two_stream_mask(model.config, 16, n_clean=(z != MASK).sum(1))
    with torch.no_grad():
        out = model(torch.cat((z, x), 1), torch.cat((order, order), 1), mask, logits_for=slice(0, 16))
    assert _max_diff(out, GOLDEN["eso_b.sequential.logits"]) < TOL


def test_mdlm_hf_folder_matches_the_authors():
    """Bidirectional, natural order, sigma = 0; max abs difference 1.1e-6"""
    model = _model("mdlm_hf")
    assert model.config.family == "mdlm" and model.config.vocab_size == 23 and model.config.mask_token_id == MASK
    with torch.no_grad():
        out = model(GOLDEN["z"], torch.arange(16).expand(5, 16), clean_mask(model.config))
    assert _max_diff(out, GOLDEN["mdlm.logits"]) < TOL


@pytest.mark.parametrize(("raw", "key"), [(False, "ema"), (True, "raw")])
def test_lightning_ema_and_raw_weights_match_the_authors(raw, key):
    """EMA (ema.shadow_params, positional): max abs difference 1.4e-6; raw state_dict: 7.2e-7"""
    imp = read_source(FIX / "eso_b_lightning.ckpt", raw=raw)
    assert (imp.config.family, imp.config.alpha_0, imp.config.batch_split) == ("eso_b", 0.25, 0.5)
    assert imp.source["weights"] == key
    model = _model("eso_b_lightning.ckpt", raw=raw)
    assert _max_diff(_diffusion(model), GOLDEN[f"eso_b_lightning.{key}.diffusion.logits"]) < TOL
    if not raw:  # the EMA weights really differ from the raw ones
        assert _max_diff(_diffusion(model), GOLDEN["eso_b_lightning.raw.diffusion.logits"]) > 1e-3


def test_ar_lightning_without_adaln_matches_the_authors_through_an_identity_modulation():
    """Causal blocks without adaLN -> zero modulation weights, gates 1; max abs difference 1.3e-6"""
    imp = read_source(FIX / "ar_lightning.ckpt")
    assert imp.config.family == "ar"
    for k, v in identity_modulation(imp.config).items():
        assert torch.equal(imp.weights[k], v)
    model = _model("ar_lightning.ckpt")
    with torch.no_grad():
        out = model(GOLDEN["ar.input"], torch.arange(16).expand(5, 16), AttentionMask("causal"))
    assert _max_diff(out, GOLDEN["ar.logits"]) < TOL


def test_the_hostile_file_is_refused_and_its_command_never_runs(capfd):
    """What the pickle would do (read with pickletools, never run): call posix.system with an
    ``echo UNSAFE ... >&2``; loading it must raise naming posix.system, and no UNSAFE line may
    reach this process's stdout or stderr (the file descriptors, so a child's output counts)."""
    with zipfile.ZipFile(FIX / "hostile.ckpt") as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    i = ops.index(("GLOBAL", "posix system"))
    command = next(arg for name, arg in ops[i:] if name == "BINUNICODE")
    assert command.startswith("echo UNSAFE") and ("REDUCE", None) in ops[i:i + 8]
    capfd.readouterr()
    with pytest.raises(UnsafePickle, match=r"refused posix\.system"):
        restricted_load(FIX / "hostile.ckpt")
    with pytest.raises(ValueError, match="refused posix.system"):
        import_model(FIX / "hostile.ckpt", Path(os.devnull) / "never.ckpt")
    out, err = capfd.readouterr()
    assert "UNSAFE" not in out + err


def _pickle_file(tmp_path: Path, payload: bytes) -> Path:
    """A torch.save-style zip whose data.pkl is ``payload``."""
    path = tmp_path / "crafted.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("crafted/data.pkl", payload)
        zf.writestr("crafted/version", "3\n")
        zf.writestr("crafted/byteorder", "little")
    return path


@pytest.mark.parametrize(("module", "name"), [("builtins", "eval"), ("builtins", "exec"),
                                              ("subprocess", "check_output"), ("os", "system"),
                                              ("importlib", "import_module")])
def test_the_unpickler_refuses_callables_by_name(tmp_path, module, name):
    payload = f"c{module}\n{name}\n(S'1'\ntR.".encode()  # protocol 0: GLOBAL, a tuple, REDUCE
    with pytest.raises(UnsafePickle, match=rf"refused {module}\.{name}"):
        restricted_load(_pickle_file(tmp_path, payload))


def test_an_unknown_class_is_skipped_but_calling_it_is_refused(tmp_path):
    """NEWOBJ + BUILD of an unknown class (the pickled tokenizer) is kept as inert data; a
    REDUCE call of an unknown name is refused, and its module is never imported."""
    import pickle
    import sys

    newobj = (b"\x80\x02}q\x00(X\x03\x00\x00\x00tokq\x01cnot_a_module.sub\nTok\nq\x02)\x81q\x03}q\x04"
              b"X\x01\x00\x00\x00aK\x01sbu.")
    obj = restricted_load(_pickle_file(tmp_path, newobj))
    assert repr(obj["tok"]) == "<skipped not_a_module.sub.Tok>" and "not_a_module" not in sys.modules
    call = b"\x80\x02cnot_a_module\nrun\nX\x02\x00\x00\x00hi\x85R."
    with pytest.raises(UnsafePickle, match="not_a_module.run"):
        restricted_load(_pickle_file(tmp_path, call))
    assert pickle.loads(newobj.replace(b"not_a_module.sub", b"collections").replace(b"Tok", b"Counter"))


def test_names_map_every_parameter_of_our_backbone():
    model = sharp_model("eso_b")
    assert set(names(model.config.n_layers)) == set(model.state_dict())


def _roundtrip(model: Backbone, tmp_path: Path, step: int = 7) -> Backbone:
    path = tmp_path / "runs" / "v" / "model.ckpt"
    save_model(path, model.config, model.state_dict(), None, step, None,
               tokenizer=chars_tokenizer(model.config.vocab_size))
    out = export_authors(path, tmp_path / "export")
    back = tmp_path / "runs" / "back" / "model.ckpt"
    import_model(out, back)
    return load_run(back)[0]


@pytest.mark.parametrize(("family", "kw"), [("eso_b", {"alpha_0": 0.125, "batch_split": 0.25}),
                                            ("eso_a", {}), ("mdlm", {}),
                                            ("bd3lm", {"block_size": 8})])
def test_export_in_the_authors_layout_round_trips_exactly(tmp_path, family, kw):
    """Export (authors' names, config keys, safetensors) then import: the same config and
    bit-identical weights (BD3-LM has no fixture: this is its test, block size from config)."""
    model = sharp_model(family, **kw)
    back = _roundtrip(model, tmp_path)
    assert back.config == model.config.replace(dropout=back.config.dropout)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["n_blocks"] == 2 and cfg["vocab_size"] == model.config.n_embed
    assert set(load_file(str(tmp_path / "export" / "model.safetensors"))) == {
        "backbone." + n for n in [*names(2).values(), "rotary_emb.inv_freq"]}
    if family == "bd3lm":
        assert cfg["model_type"] == "bd3lm" and cfg["block_size"] == 8 and "hidden_dim" in cfg


def test_the_fixtures_round_trip_and_an_ar_export_has_no_adaln(tmp_path):
    for src in ("eso_b_hf", "ar_lightning.ckpt"):
        imp = read_source(FIX / src)
        model = Backbone(imp.config)
        model.load_state_dict(imp.ema_weights if imp.ema_weights is not None else imp.weights)
        back = _roundtrip(model, tmp_path / src)
        assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    keys = load_file(str(tmp_path / "ar_lightning.ckpt" / "export" / "model.safetensors"))
    assert not [k for k in keys if "adaLN" in k or "sigma_map" in k]
    assert set(keys) == set(restricted_load(FIX / "ar_lightning.ckpt")["state_dict"])  # the authors' AR names
    bad = sharp_model("ar")  # random modulations: the AR layout cannot hold them
    with pytest.raises(ValueError, match="identity modulation"):
        to_dit(bad.state_dict(), bad.config)


def test_an_unknown_parameter_is_refused():
    imp = read_source(FIX / "mdlm_hf")
    dit = {k.removeprefix("backbone."): v for k, v in load_file(str(FIX / "mdlm_hf" / "model.safetensors")).items()}
    with pytest.raises(ValueError, match="unexpected parameter backbone.extra.weight"):
        to_esolm({**dit, "extra.weight": torch.zeros(1)}, imp.config)


def test_esolm_load_reads_a_folder_and_a_hub_id(monkeypatch):
    import huggingface_hub

    import esolm

    model, tok = esolm.load(FIX / "mdlm_hf")
    assert model.config.family == "mdlm" and tok.get_vocab_size() == 23
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, allow_patterns: str(FIX / "eso_b_hf"))
    model, _ = esolm.load("hf:sahoo-diffusion/Eso-LM-B-alpha-0_25")
    assert (model.config.family, model.config.alpha_0) == ("eso_b", 0.25)


def test_a_hub_id_offline_is_one_line_naming_a_local_folder(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["import", "hf:esolm-tests/no-such-model", "--variant", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "HF_HUB_OFFLINE" in err and "import that folder" in err


def test_import_and_export_verbs(tmp_path, monkeypatch, capsys):
    """esolm import (EMA by default), export --layout authors with a front-matter card and
    0644 files, a refused non-export folder, --force."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    text = (root / "params.yaml").read_text().replace(
        "\nvariants:", "\nvariants:\n  fix: {family: eso_b, alpha_0: 0.25, batch_split: 0.5}", 1)
    params.write_text(text)
    assert main(["import", str(FIX / "eso_b_lightning.ckpt"), "--variant", "fix", "--params", str(params)]) == 0
    ckpt = torch.load(tmp_path / "runs" / "fix" / "model.ckpt", weights_only=True)
    assert ckpt["source"]["weights"] == "ema" and ckpt["ema_weights"] is not None
    user = tmp_path / "mine"
    user.mkdir()
    (user / "README.md").write_text("my notes")
    old = os.umask(0o022)
    try:
        args = ["export", "--variant", "fix", "--layout", "authors", "--params", str(params), "--out"]
        assert main([*args, str(user)]) == 2
        assert "not an esolm export" in capsys.readouterr().err
        assert (user / "README.md").read_text() == "my notes"
        assert main([*args, str(tmp_path / "out")]) == 0
        assert main([*args, str(tmp_path / "out")]) == 0  # its own export is overwritten
        assert main([*args, str(user), "--force"]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == dict.fromkeys(
        ("config.json", "model.safetensors", "tokenizer.json", "README.md"), 0o644)
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "esolm" and front["license"] == "apache-2.0"
    assert "eso_b" in front["tags"] and front["esolm_step"] == 1234
