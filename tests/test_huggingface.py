"""--to huggingface: tiny transformers (GPT-2-style with tied embeddings, the same with a LoRA adapter, BERT-style)
trained a step or two with a real Trainer, exported as from_pretrained folders and graphs, loaded back offline with
transformers itself; nothing downloaded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import available_formats, invoke, peak_above_imports_script

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
        "sharded": (hf_ckpts["gpt2"], ["--max-shard-size", "40KB", "-o", out / "sharded", "--random-inputs", "1"]),
        "dcp": (hf_ckpts["gpt2_dcp"], ["--max-shard-size", "40KB", "-o", out / "dcp", "--random-inputs", "1"]),
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


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every BuiltModule the pipeline builds in this test, in order."""
    from lightning_export.construct import module as module_mod

    made: list = []
    real = module_mod.build_module

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr("lightning_export.pipeline.prepare.build_module", spy)
    return made


def test_no_verify_leaves_the_parameters_on_meta_and_writes_the_same_bytes(hf_ckpts, exported, tmp_path, built):
    """--no-verify from the DCP folder and from the .ckpt: the module keeps its parameters on the meta device (the
    writer reads every tensor from the checkpoint, tied weights found by the parameter the module shares), and the
    folder is byte for byte the verified one's."""
    want = exported["sharded"][0]
    for name in ("gpt2_dcp", "gpt2"):
        res = invoke(hf_ckpts[name], "--module", GPT2, "--to", "hf", "--max-shard-size", "40KB", "--no-verify",
                     "-o", tmp_path / name, "--json")
        assert res.code == 0, res
        assert built[-1].parameters_on_meta
        assert all(p.device.type == "meta" for p in built[-1].module.parameters())
        got = tmp_path / name
        assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
        for p in want.iterdir():
            assert p.read_bytes() == (got / p.name).read_bytes(), p.name
        assert res.json()["artifacts"][0]["info"]["tied_keys"] == ["lm_head.weight"]


def test_no_verify_with_a_lora_adapter_loads_the_weights_and_merges(hf_ckpts, tmp_path):
    """A peft adapter needs the weights' values (merged into a copy): --no-verify loads them as without it."""
    res = invoke(hf_ckpts["gpt2_lora"], "--module", GPT2, "--attr", "model", "--to", "hf", "--no-verify",
                 "-o", tmp_path / "lora", "--json")
    assert res.code == 0, res
    assert any("merged" in n and "LoraConfig" in n for n in res.json()["notes"])
    model, info = _load(tmp_path / "lora")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in k for k in model.state_dict())


def test_no_verify_with_weights_stored_in_another_dtype_loads_and_casts_them(hf_ckpts, tmp_path, built):
    """A checkpoint whose weights are bfloat16 (Trainer(precision="bf16-true")) into the float32 module the
    constructor makes: the writer needs the cast tensors, so --no-verify loads the parameters (cast on load) instead
    of leaving them on meta; the folder holds the float32 values of the stored bfloat16 weights."""
    import torch
    from safetensors.torch import load_file

    raw = torch.load(hf_ckpts["gpt2"], weights_only=False, map_location="cpu")
    raw["state_dict"] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in raw["state_dict"].items()}
    ckpt = tmp_path / "bf16.ckpt"
    torch.save(raw, ckpt)
    res = invoke(ckpt, "--module", GPT2, "--to", "hf", "--no-verify", "-o", tmp_path / "hf")
    assert res.code == 0, res
    assert not built[-1].parameters_on_meta
    got = load_file(tmp_path / "hf" / "model.safetensors")
    want = raw["state_dict"]["model.transformer.wte.weight"].float()
    assert got["transformer.wte.weight"].dtype == torch.float32
    assert torch.equal(got["transformer.wte.weight"], want)

_MEASURE = peak_above_imports_script(
    "torch, torch.distributed.checkpoint, safetensors.torch, huggingface_hub, lightning_export.sources.dcp, "
    "lightning_export.formats.huggingface, fixtures.transformers_modules, transformers.models.gpt2.modeling_gpt2")


@pytest.fixture(scope="module")
def big_gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A DCP folder in Lightning's layout of a ~100 MiB GPT-2 (8 layers of n_embd 512: its largest tensor 4 MiB),
    written directly with random values (the module built on meta for its keys: a real init takes seconds); tied
    names hold equal values, each key its own tensor as FSDP saves them. (folder, bytes of the distinct weights)."""
    import torch
    import torch.distributed.checkpoint as dcp

    from fixtures.transformers_modules import TinyGPT2Module

    hp = {"lora": False, "lr": 1e-2, "n_embd": 512, "n_layer": 8, "vocab_size": 2000}
    with torch.device("meta"):
        module = TinyGPT2Module(**hp)
    g = torch.Generator().manual_seed(0)
    values: dict[int, torch.Tensor] = {}
    sd = {}
    for k, t in module.state_dict(keep_vars=True).items():
        if id(t) not in values:
            values[id(t)] = (torch.randn(t.shape, generator=g) * 0.02).to(t.dtype) if t.dtype.is_floating_point \
                else torch.zeros(t.shape, dtype=t.dtype)
        sd[k] = values[id(t)].clone()
    weights = sum(v.numel() * v.element_size() for v in values.values())
    folder = tmp_path_factory.mktemp("big_gpt2") / "big_gpt2.ckpt"
    dcp.save({"model": sd}, checkpoint_id=folder, no_dist=True)
    torch.save({"epoch": 0, "global_step": 1, "hyper_parameters": hp}, folder / "meta.pt")
    return folder, weights


def test_no_verify_peak_memory_is_about_a_tensor_not_the_model(big_gpt2_folder, tmp_path):
    """A real process: --to hf --no-verify from a DCP folder of ~100 MiB of weights, 10 MB shards. Its anonymous
    memory (sampled every 2 ms) rises by well under half the weights over what it holds after the imports: the
    parameters stay on the meta device and the writer reads one tensor at a time from the folder (measured ~16 MiB;
    with the module's weights loaded, as before, ~122 MiB). Large freed blocks go back to the system (a fixed glibc
    mmap threshold, as in test_sharded)."""
    import re
    import subprocess
    import sys

    folder, weights = big_gpt2_folder
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(folder), "--module", GPT2, "--to", "hf", "--max-shard-size", "10MB",
         "--no-verify", "-o", str(tmp_path / "hf"), "-q"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "HF_HUB_OFFLINE": "1"},
    )
    m = re.search(r"PEAK_ABOVE_IMPORTS (\d+) EXIT (\S+)", proc.stderr)
    assert m and m.group(2) in ("0", "None"), proc.stderr[-3000:]
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) >= 8
    above = int(m.group(1))
    assert above < 0.5 * weights, f"peak {above / 2**20:.0f} MiB above the imports for {weights / 2**20:.0f} MiB"


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
    said = res.stdout + res.stderr
    assert "PreTrainedModel" in said and "Embedding" in said
    # --attr went past the model: the hint names the one that works (the LightningModule's, not inside wte).
    assert "Select one with --attr model." in said and "No submodule" not in said, said


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
    """Without use_cache=False both exits 5 ("DynamicCache ... register a pytree"). With token-level --data (dict
    batches of input_ids, attention_mask, labels; no --data-input: the keys the exported graph does not take are
    left out): the [B, S, V] logits agree per token, counted over the positions the attention mask keeps."""
    import torch

    from fixtures.transformers_modules import text_dicts

    batches = text_dicts(48, seed=31, batch=8)
    for b in batches:
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    torch.save(batches, tmp_path / "lm.pt")
    res = invoke(hf_ckpts["gpt2"], "--module", GPT2, "--attr", "model", "--to", "onnx,exported-program",
                 "--output-dir", tmp_path, "--json", "--random-inputs", "2", "--data", tmp_path / "lm.pt")
    assert res.code == 0, res
    report = res.json()
    # The example (and so the graph) takes input_ids only: the batches' attention_mask is not fed (it still counts
    # the positions), the labels are the labels.
    assert "attention_mask not among the exported inputs (input_ids)" in report["data"]["rule"], report["data"]
    assert all(a["verification"]["passed"] for a in report["artifacts"])
    assert any("use_cache=False" in n for n in report["notes"])
    kept = int(sum(b["attention_mask"].sum() for b in batches))
    assert kept < 48 * 8  # some padding, which must not count
    for art in report["artifacts"]:
        (out,) = art["verification"]["agreement"]["outputs"]
        assert out["classes"] == 96 and out["compared"] == kept and out["labelled"] == kept
        assert out["agreement"] == 1.0


def test_token_level_agreement_counts_unmasked_positions_only():
    import torch

    from lightning_export.agreement import measure

    e = torch.zeros(1, 4, 3)
    e[..., 0] = 1
    a = e.clone()
    a[0, 3, 2] = 5  # disagrees at a padded position only
    mask = torch.tensor([[1, 1, 1, 0]])
    assert measure([e], [a], None, [mask]).agreement == 1.0
    assert measure([e], [a]).agreement == 0.75


def test_data_input_takes_several_keys():
    import torch

    from lightning_export.data.batches import forward_signature, parse_pick, to_inputs

    def forward(input_ids, attention_mask=None, labels=None):
        return input_ids

    batch = {"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3), "labels": torch.tensor([0, 1]),
             "token_type_ids": torch.zeros(2, 3)}
    sig = forward_signature(forward)
    inputs, labels, _ = to_inputs(batch, sig)
    assert sorted(inputs.kwargs) == ["attention_mask", "input_ids"] and labels.tolist() == [0, 1]  # labels not passed
    pick = parse_pick("input_ids, attention_mask")
    assert pick == ("input_ids", "attention_mask")
    inputs, labels, rule = to_inputs(batch, sig, pick)
    assert list(inputs.kwargs) == ["input_ids", "attention_mask"] and labels.tolist() == [0, 1]


@pytest.fixture(scope="session")
def bert_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fixtures.transformers_modules import make_transformer_checkpoints

    return make_transformer_checkpoints(tmp_path_factory.mktemp("bert"), names=("bert",))["bert"]


def test_text_batches_padded_to_other_lengths_name_the_dynamic_flag(bert_ckpt, tmp_path):
    """Batches padded per batch (a collator's lengths 4 to 7; the example's is 8) cannot run in a program
    exported with the example's shapes: exit 2 before any export, naming the input, the dim and --dynamic 0,1 (not
    one runtime error per batch); with --dynamic they verify."""
    import torch

    from fixtures.transformers_modules import text_dicts

    batches = [{k: (v[:, :n] if v.dim() == 2 else v) for k, v in b.items()}
               for b, n in zip(text_dicts(64, seed=5, batch=16), (4, 5, 6, 7))]
    torch.save(batches, tmp_path / "padded.pt")
    res = invoke(bert_ckpt, "--module", BERT, "--to", "onnx", "--data", tmp_path / "padded.pt", "--output-dir",
                 tmp_path / "out", "--json")
    assert res.code == 2, res
    error = res.json()["error"]
    assert "input_ids dim 1 = 4, 5, 6, 7" in error["message"] and "--dynamic 0,1 " in error["message"], error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    res = invoke(bert_ckpt, "--module", BERT, "--to", "onnx", "--data", tmp_path / "padded.pt", "--dynamic",
                 "0,1:1..64", "--output-dir", tmp_path / "out", "--json")  # its 64 positions bound the length
    assert res.code == 0, res
    assert res.json()["artifacts"][0]["verification"]["agreement"]["samples"] == 64


def test_int8_dynamic_bert_onnx_gated_on_text_batches(bert_ckpt, tmp_path):
    import torch

    from fixtures.transformers_modules import text_dicts

    torch.save(text_dicts(320, seed=21, batch=32), tmp_path / "text.pt")
    res = invoke(bert_ckpt, "--module", BERT, "--to", "onnx", "--quantize", "int8-dynamic", "--dynamic-batch",
                 "--data", tmp_path / "text.pt", "--output-dir", tmp_path, "--json", "--random-inputs", "2")
    assert res.code == 0, res
    (art,) = res.json()["artifacts"]
    agreement = art["verification"]["agreement"]
    assert agreement["gated"] and agreement["samples"] == 320 and agreement["agreement"] >= 0.99
    assert agreement["eager_accuracy"] >= 0.8  # the classifier learned the task
    assert art["info"]["size_ratio"] < 0.3 and art["info"]["inputs"] == ["input_ids", "attention_mask"]
    # The gate can fail: a --min-agreement above what int8 reaches here is exit 1.
    if agreement["agreement"] < 1.0:
        res = invoke(bert_ckpt, "--module", BERT, "--to", "onnx", "--quantize", "int8-dynamic", "--dynamic-batch",
                     "--data", tmp_path / "text.pt", "-o", tmp_path / "strict.onnx", "--min-agreement", "1")
        assert res.code == 1, res


def test_bert_with_dynamic_batch_and_length(bert_ckpt, tmp_path):
    """--dynamic 0,1: the BERT-style classifier verified by lexport at several (batch, length) pairs, then run in
    each runtime here at a length the verification did not use."""
    import torch

    from fixtures.transformers_modules import text_batch

    formats = available_formats(["onnx", "exported-program", "openvino"])
    res = invoke(bert_ckpt, "--module", BERT, "--to", ",".join(formats), "--dynamic", "0,1:1..64",
                 "--output-dir", tmp_path, "--json", "--random-inputs", "1")
    assert res.code == 0, res
    arts = {a["format"]: a for a in res.json()["artifacts"]}
    checked = {tuple(map(tuple, c["shapes"])) for a in arts.values() for c in a["verification"]["shapes_checked"]}
    assert len({s[0] for s in checked}) >= 3, checked  # several (batch, length) pairs
    ids, mask, _ = text_batch(3, seed=44, seq=23)
    from fixtures.transformers_modules import TinyBertClassifier

    module = TinyBertClassifier.load_from_checkpoint(bert_ckpt, map_location="cpu", weights_only=False).eval()
    with torch.no_grad():
        want = module(ids, mask)
    if "onnx" in arts:
        import onnxruntime as ort

        sess = ort.InferenceSession(arts["onnx"]["path"], providers=["CPUExecutionProvider"])
        (got,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-3, atol=1e-4)
    if "exported-program" in arts:
        program = torch.export.load(arts["exported-program"]["path"]).module()
        torch.testing.assert_close(program(ids, mask), want, rtol=1e-5, atol=1e-5)
    if "openvino" in arts:
        import openvino as ov

        compiled = ov.Core().compile_model(arts["openvino"]["path"], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = compiled([ids.numpy(), mask.numpy()])[0]
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-3, atol=1e-4)


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


@pytest.mark.parametrize("case", ["names-a-function", "pickle-beside-bad-safetensors", "huge-config"])
def test_a_hostile_folder_given_to_verify_fails_cleanly(hf_ckpts, tmp_path, case):
    """A folder handed to `lexport verify` is untrusted: config.json may name only a PreTrainedModel class, weights
    come from safetensors only (a pickled pytorch_model.bin beside them is never read), config.json is bounded."""
    from hostile import payloads, write_torch_zip
    from hostile_pickle import call

    folder, marker = tmp_path / "evil-hf", tmp_path / "MARKER"
    folder.mkdir()
    architecture = "pipeline" if case == "names-a-function" else "GPT2LMHeadModel"
    config = {"architectures": [architecture], "model_type": "gpt2"}
    if case == "huge-config":
        config["padding"] = "x" * (17 << 20)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"\0" * 64)
    module, qual, args = payloads(marker)["os.system"]
    write_torch_zip(folder / "pytorch_model.bin", [("data.pkl", b"\x80\x02" + call(module, qual, *args) + b"."),
                                                   ("byteorder", b"little"), ("version", b"3\n")], prefix="archive")
    res = invoke("verify", folder, hf_ckpts["gpt2"], "--module", GPT2, "--attr", "model", "--json")
    assert res.code == 1, res
    (art,) = res.json()["artifacts"]
    assert art["format"] == "huggingface" and not art["verification"]["passed"]
    assert not marker.exists()
