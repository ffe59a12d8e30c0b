"""An exported checkpoint loads in HF transformers' LlamaForCausalLM (CPU, fp32) and gives
the same logits as our model: max |difference| <= 1e-4 (both fp32; only summation order
differs)."""
import json

import torch
from transformers import LlamaForCausalLM

from conftest import run


def test_hf_llama_loads_checkpoint_and_matches_logits(tmp_path):
    out = tmp_path / "run"
    run("--config", "configs/tiny.yaml", "--max-steps", "3", "--out-dir", str(out), "--quiet")
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["hidden_act"] == "relu" and cfg["architectures"] == ["LlamaForCausalLM"]
    tokens = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    ours = torch.tensor(json.loads(run("logits", "--checkpoint", str(ckpt), "--tokens", ",".join(map(str, tokens))).stdout))
    model = LlamaForCausalLM.from_pretrained(str(ckpt), torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        theirs = model(torch.tensor([tokens])).logits[0]
    assert ours.shape == theirs.shape == (len(tokens), cfg["vocab_size"])
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-4, f"max |logit difference| {diff}"
