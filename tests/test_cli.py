"""`hf-int4 repack` and `hf-int4 inspect` on checkpoints written by the fixture writer."""
import hashlib
import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_int4 import GPTQConfig, HfInt4Config, HfInt4Linear
from hf_int4.cli import main
from hf_int4.formats.gptq_writer import tiny_llama_config, write_gptq_checkpoint


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt") / "gptq"
    config = GPTQConfig(group_size=32, sym=False, desc_act=True, checkpoint_format="gptq_v2")
    write_gptq_checkpoint(LlamaForCausalLM(tiny_llama_config()), out, config, max_shard_size="40KB", progress=False)
    (out / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return out


def _digest(directory):
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        h.update(name.encode())
        h.update(open(os.path.join(directory, name), "rb").read())
    return h.hexdigest()


def test_repack_loads_without_repacking_and_matches_gptq_load(gptq_dir, tmp_path):
    before = _digest(gptq_dir)
    out = tmp_path / "packed"
    assert main(["repack", str(gptq_dir), str(out), "--max-shard-size", "30KB"]) == 0
    assert _digest(gptq_dir) == before, "the input checkpoint is never touched"
    assert (out / "tokenizer_config.json").exists() and (out / "generation_config.json").exists()
    assert (out / "model.safetensors.index.json").exists(), "bounded shards"
    qc = json.load(open(out / "config.json"))["quantization_config"]
    assert (qc["quant_method"], qc["weight_format"], qc["group_size"], qc["sym"]) == ("hf_int4", "packed", 32, False)

    packed = AutoModelForCausalLM.from_pretrained(out)
    assert packed.dtype == torch.float16
    assert all(m.is_packed for m in packed.modules() if isinstance(m, HfInt4Linear))
    gptq = AutoModelForCausalLM.from_pretrained(gptq_dir, quantization_config=HfInt4Config(), dtype=torch.float16)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, gptq(ids).logits)


def test_repack_refuses_non_empty_output_unless_overwrite(gptq_dir, tmp_path, capsys):
    out = tmp_path / "packed"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["repack", str(gptq_dir), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    assert main(["repack", str(gptq_dir), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_repack_failure_leaves_nothing_behind(gptq_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(gptq_dir):
        (bad / name).write_bytes((gptq_dir / name).read_bytes())
    cfg = json.load(open(bad / "config.json"))
    cfg["quantization_config"]["sym"] = True  # the zeros are asymmetric: the first layer must be refused
    json.dump(cfg, open(bad / "config.json", "w"))
    out = tmp_path / "out"
    assert main(["repack", str(bad), str(out)]) == 2
    assert "sym=True" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bad"], "no output and no temporary directory left"


def test_repack_of_a_checkpoint_without_gptq_layers_is_refused(gptq_dir, tmp_path, capsys):
    """e.g. AutoGPTQ's Marlin-serialized tensors (B, s) under a config that does not say so: no output that claims
    to be packed while it holds the input's tensors unchanged."""
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(gptq_dir / "config.json", src / "config.json")
    save_file({"model.layers.0.mlp.down_proj.B": torch.zeros(8, 512, dtype=torch.int32)}, str(src / "model.safetensors"))
    assert main(["repack", str(src), str(tmp_path / "out")]) == 2
    assert "holds no GPTQ layers" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_repack_refuses_output_inside_input(gptq_dir, capsys):
    assert main(["repack", str(gptq_dir), str(gptq_dir / "sub")]) == 2
    assert "must not be" in capsys.readouterr().err


def test_inspect(gptq_dir, tmp_path, capsys):
    assert main(["inspect", str(gptq_dir)]) == 0
    text = capsys.readouterr().out
    assert "GPTQ (gptq_v2)" in text and "quantized_layers: 14" in text and "group_size: 32" in text
    out = tmp_path / "packed"
    main(["repack", str(gptq_dir), str(out)])
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "hf_int4 packed" in capsys.readouterr().out


def _config_only_copy(gptq_dir, dst, quantization_config, in_config_json: bool):
    """A copy of gptq_dir's tensors with the quantization config stated as other tools write it."""
    os.makedirs(dst)
    for name in os.listdir(gptq_dir):
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            os.link(os.path.join(gptq_dir, name), os.path.join(dst, name))
    model_config = json.loads((gptq_dir / "config.json").read_text())
    model_config.pop("quantization_config")
    if in_config_json:
        model_config["quantization_config"] = quantization_config
    else:
        (dst / "quantize_config.json").write_text(json.dumps(quantization_config))
    (dst / "config.json").write_text(json.dumps(model_config))


def test_inspect_reads_the_format_as_the_reader_does(gptq_dir, tmp_path, capsys):
    # GPTQModel names the setting "format"
    gptqmodel = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": True, "format": "gptq_v2"}
    _config_only_copy(gptq_dir, tmp_path / "gptqmodel", gptqmodel, in_config_json=True)
    assert main(["inspect", str(tmp_path / "gptqmodel")]) == 0
    assert "GPTQ (gptq_v2)" in capsys.readouterr().out
    # older AutoGPTQ: no quantization_config in config.json, quantize_config.json without quant_method
    autogptq = {"bits": 4, "group_size": 32, "sym": False, "desc_act": True, "checkpoint_format": "gptq_v2"}
    _config_only_copy(gptq_dir, tmp_path / "autogptq", autogptq, in_config_json=False)
    assert main(["inspect", str(tmp_path / "autogptq")]) == 0
    text = capsys.readouterr().out
    assert "GPTQ (gptq_v2)" in text and "group_size: 32" in text and "desc_act: True" in text, text
    # a GPTQ checkpoint the loader refuses says why
    eight_bit = dict(gptqmodel, bits=8)
    _config_only_copy(gptq_dir, tmp_path / "eight_bit", eight_bit, in_config_json=True)
    assert main(["inspect", str(tmp_path / "eight_bit")]) == 0
    assert "not loadable" in (text := capsys.readouterr().out) and "bits=8" in text, text


def test_repack_refuses_output_that_contains_the_input(gptq_dir, tmp_path, capsys):
    """--overwrite of a directory holding the input (directly or through a link) would delete the input."""
    outer = tmp_path / "outer"
    outer.mkdir()
    src = outer / "gptq"
    shutil.copytree(gptq_dir, src)
    (tmp_path / "link").symlink_to(src)
    before = _digest(src)
    for given in (src, tmp_path / "link"):
        assert main(["repack", str(given), str(outer), "--overwrite"]) == 2
        assert "must not contain" in capsys.readouterr().err
    assert os.listdir(outer) == ["gptq"] and _digest(src) == before


def test_repack_output_replaces_a_file_and_has_ordinary_permissions(gptq_dir, tmp_path):
    """Overwriting a file leaves no trace of it; the output directory gets the umask's permissions, as one
    os.makedirs makes (not a temporary directory's 0700)."""
    out = tmp_path / "out"
    out.write_text("not a checkpoint")
    probe = tmp_path / "probe"
    probe.mkdir()
    assert main(["repack", str(gptq_dir), str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["out", "probe"]
    assert (out / "config.json").exists()
    assert os.stat(out).st_mode & 0o777 == os.stat(probe).st_mode & 0o777


@pytest.mark.parametrize("device", ["foo", "cuda:0"])
def test_repack_bad_device_is_a_usage_error(gptq_dir, tmp_path, capsys, device):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    with pytest.raises(SystemExit) as exit_info:
        main(["repack", str(gptq_dir), str(tmp_path / "out"), "--device", device])
    assert exit_info.value.code == 2 and "argument --device" in capsys.readouterr().err
    assert os.listdir(tmp_path) == [], "nothing written"
