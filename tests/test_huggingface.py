"""--to huggingface: tiny transformers (GPT-2-style with tied embeddings, the same with a LoRA adapter, BERT-style)
trained a step or two with a real Trainer, exported as from_pretrained folders and graphs, loaded back offline with
transformers itself; nothing downloaded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import invoke

pytest.importorskip("transformers", reason="needs the huggingface extra (transformers)")
os.environ["HF_HUB_OFFLINE"] = "1"

GPT2 = "fixtures.transformers_modules:TinyGPT2Module"
BERT = "fixtures.transformers_modules:TinyBertClassifier"


@pytest.fixture(scope="session")
def hf_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("peft", reason="needs the huggingface extra (peft)")
    from fixtures.transformers_modules import make_transformer_checkpoints, save_dcp_folder

    out = tmp_path_factory.mktemp("hf_ckpts")
    made = make_transformer_checkpoints(out, names=("gpt2", "gpt2_lora"))
    made["gpt2_dcp"] = save_dcp_folder(made["gpt2"], out / "gpt2_dcp.ckpt")
    return made


@pytest.fixture(scope="session")
def exported(hf_ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """name -> (folder, --json report): the GPT-2 folder whole and sharded (from the .ckpt and from the DCP folder)."""
    out = tmp_path_factory.mktemp("hf_out")
    runs = {
        "whole": (hf_ckpts["gpt2"], ["--attr", "model"]),
        "sharded": (hf_ckpts["gpt2"], ["--max-shard-size", "40KB", "-o", out / "sharded"]),
        "dcp": (hf_ckpts["gpt2_dcp"], ["--max-shard-size", "40KB", "-o", out / "dcp"]),
    }
    made = {}
    for name, (ckpt, extra) in runs.items():
        res = invoke(ckpt, "--module", GPT2, "--to", "hf", "--output-dir", out, "--json", *extra)
        assert res.code == 0, res
        report = res.json()
        made[name] = (Path(report["artifacts"][0]["path"]), report)
    return made


def _eager(ckpt: Path):
    import torch

    from fixtures.transformers_modules import TinyGPT2Module

    module = TinyGPT2Module.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False).eval()
    ids = torch.randint(2, 96, (3, 11), generator=torch.Generator().manual_seed(5))
    return module, ids


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    return model.eval(), info


def test_gpt2_folder_loads_offline_ties_kept_logits_and_generate_equal(hf_ckpts, exported):
    import torch

    folder, report = exported["whole"]
    assert folder.name == "gpt2-hf"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["dtype"] == "float32"
    assert config["use_cache"] is True  # the user's value, although the export ran without a cache
    art = report["artifacts"][0]
    assert art["verification"]["passed"] and art["verification"]["inputs_checked"] == 6
    assert any("use_cache=False" in n for n in report["notes"])

    model, info = _load(folder)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.lm_head.weight is model.transformer.wte.weight  # retied on load
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "transformer.wte.weight" in f.keys()  # stored once

    module, ids = _eager(hf_ckpts["gpt2"])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, module(ids), rtol=0, atol=0)
        want = module.model.generate(ids[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=1)
        got = model.generate(ids[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert torch.equal(got, want) and got.shape == (3, 10)


@pytest.mark.parametrize("name", ["sharded", "dcp"])
def test_small_max_shard_size_writes_shards_and_an_index_covering_every_key(hf_ckpts, exported, name):
    import torch
    from safetensors import safe_open

    folder, report = exported[name]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (folder / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    stored = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            stored.update({k: shard.name for k in f.keys()})
    assert index["weight_map"] == stored
    module, ids = _eager(hf_ckpts["gpt2"])
    expected = set(module.model.state_dict()) - {"lm_head.weight"}
    assert set(stored) == expected
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for k, t in
                                                  module.model.state_dict().items() if k != "lm_head.weight")
    assert report["artifacts"][0]["info"]["shards"] == len(shards)
    model, info = _load(folder)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, module(ids), rtol=0, atol=0)


def test_dcp_folder_and_ckpt_give_the_same_bytes(exported):
    a, b = exported["sharded"][0], exported["dcp"][0]
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.glob("*.safetensors"):
        assert p.read_bytes() == (b / p.name).read_bytes()


def test_held_one_model_is_selected_with_a_note(exported):
    notes = exported["sharded"][1]["notes"]
    assert any("holds one transformers model, model (GPT2LMHeadModel)" in n for n in notes)


def test_force_replaces_the_whole_folder(hf_ckpts, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    res = invoke(hf_ckpts["gpt2"], "--module", GPT2, "--to", "hf", "-o", folder)
    assert res.code == 6 and "already exists" in res.stdout + res.stderr
    assert (folder / "stale.txt").exists()
    res = invoke(hf_ckpts["gpt2"], "--module", GPT2, "--to", "hf", "-o", folder, "--force", "--json")
    assert res.code == 0, res
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lexport-tmp-")]


def test_verify_an_existing_folder(hf_ckpts, exported):
    folder, _ = exported["whole"]
    res = invoke("verify", folder, hf_ckpts["gpt2"], "--module", GPT2, "--attr", "model", "--json")
    assert res.code == 0, res
    art = res.json()["artifacts"][0]
    assert art["format"] == "huggingface" and art["verification"]["passed"] and art["bytes"] > 100_000


def test_a_folder_that_computes_something_else_fails_verify(hf_ckpts, exported, tmp_path):
    folder = tmp_path / "edited-hf"
    shutil.copytree(exported["whole"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["layer_norm_epsilon"] = 0.5  # same keys, another computation
    (folder / "config.json").write_text(json.dumps(config))
    res = invoke("verify", folder, hf_ckpts["gpt2"], "--module", GPT2, "--attr", "model", "--json")
    assert res.code == 1, res


def test_not_a_pretrained_model_is_exit_2_naming_the_class(hf_ckpts, tmp_path):
    res = invoke(hf_ckpts["gpt2"], "--module", GPT2, "--attr", "model.transformer.wte", "--to", "hf",
                 "--output-dir", tmp_path)
    assert res.code == 2, res
    assert "PreTrainedModel" in res.stdout + res.stderr and "Embedding" in res.stdout + res.stderr


def test_bad_max_shard_size_is_exit_2(hf_ckpts, tmp_path):
    res = invoke(hf_ckpts["gpt2"], "--module", GPT2, "--to", "hf", "--max-shard-size", "lots", "--output-dir", tmp_path)
    assert res.code == 2 and "200KB" in res.stdout + res.stderr


def test_parse_size_as_transformers():
    from lightning_export.formats.huggingface import parse_size

    assert parse_size("200KB") == 200_000 and parse_size("5GiB") == 5 * 2**30 and parse_size("1000") == 1000


def test_tokenizer_is_checked_and_copied(hf_ckpts, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i for i in range(2, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(tmp_path / "tok")
    res = invoke(hf_ckpts["gpt2"], "--module", GPT2, "--to", "hf", "--tokenizer", tmp_path / "tok",
                 "-o", tmp_path / "with-tok", "--random-inputs", "1")
    assert res.code == 0, res
    loaded = AutoTokenizer.from_pretrained(tmp_path / "with-tok", local_files_only=True)
    assert loaded("w5 w7")["input_ids"] == [5, 7]
    (tmp_path / "bad").mkdir()
    res = invoke(hf_ckpts["gpt2"], "--module", GPT2, "--to", "hf", "--tokenizer", tmp_path / "bad",
                 "-o", tmp_path / "no")
    assert res.code == 2 and "tokenizer_config.json" in res.stdout + res.stderr


def test_lora_is_merged_and_verified_against_the_unmerged_module(hf_ckpts, tmp_path):
    import onnxruntime as ort
    import torch

    from fixtures.transformers_modules import TinyGPT2Module

    raw = torch.load(hf_ckpts["gpt2_lora"], weights_only=True)["state_dict"]
    assert max(v.abs().max().item() for k, v in raw.items() if "lora_B" in k) > 0  # the adapter learned something
    res = invoke(hf_ckpts["gpt2_lora"], "--module", GPT2, "--attr", "model", "--to", "hf,onnx",
                 "--output-dir", tmp_path, "--json")
    assert res.code == 0, res
    report = res.json()
    assert any("merged" in n and "LoraConfig" in n for n in report["notes"])
    arts = {a["format"]: a for a in report["artifacts"]}
    assert all(a["verification"]["passed"] for a in arts.values())
    assert arts["onnx"]["info"]["inputs"] == ["input_ids"]  # not kwargs_input_ids
    folder = Path(arts["huggingface"]["path"])
    assert not (folder / "adapter_config.json").exists()
    model, info = _load(folder)  # transformers alone, no peft
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in k for k in model.state_dict())

    module = TinyGPT2Module.load_from_checkpoint(hf_ckpts["gpt2_lora"], map_location="cpu", weights_only=False).eval()
    ids = torch.randint(2, 96, (2, 8), generator=torch.Generator().manual_seed(8))  # the onnx graph's static shape
    with torch.no_grad():
        unmerged = module(ids)
        with module.model.disable_adapter():
            base = module(ids)
        got = model(input_ids=ids).logits
    assert (unmerged - base).abs().max() > 1e-3  # the adapter changes the outputs
    torch.testing.assert_close(got, unmerged, rtol=1e-4, atol=1e-5)
    session = ort.InferenceSession(arts["onnx"]["path"], providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"input_ids": ids.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), unmerged, rtol=1e-4, atol=1e-4)


def test_gpt2_lm_exports_to_onnx_and_exported_program_without_a_cache(hf_ckpts, tmp_path):
    res = invoke(hf_ckpts["gpt2"], "--module", GPT2, "--attr", "model", "--to", "onnx,exported-program",
                 "--output-dir", tmp_path, "--json", "--random-inputs", "2")
    assert res.code == 0, res
    report = res.json()
    assert all(a["verification"]["passed"] for a in report["artifacts"])
    assert any("use_cache=False" in n for n in report["notes"])


def test_dynamic_dims_are_verified_at_other_sizes_in_the_folder(hf_ckpts, tmp_path):
    # The folder stores no shapes: with --dynamic, transformers' class is run at other batch sizes and lengths.
    res = invoke(hf_ckpts["gpt2"], "--module", GPT2, "--attr", "model", "--to", "hf", "--dynamic", "0,1",
                 "--output-dir", tmp_path, "--json", "--random-inputs", "1")
    assert res.code == 0, res
    art = res.json()["artifacts"][0]
    assert art["verification"]["passed"]
    checked = [tuple(s) for r in art["verification"]["shapes_checked"] for s in r["shapes"]]
    assert {c[0] for c in checked} >= {1, 2, 5} and {c[1] for c in checked} >= {4, 8, 17}, checked
    assert [d["dim"] for d in art["info"]["dynamic_dims"]] == [0, 1]
