"""Tokenizers made here are ordinary Hugging Face tokenizers: one trained by `sparse-train
tokenizer train` encodes a file to the same ids in the Python `tokenizers` package as in our
`prepare` (read back from the shards), and the tokenizer a checkpoint carries loads in
transformers' `AutoTokenizer` and encodes and decodes as ours does, for a trained tokenizer and
for the bundled GPT-2."""
import json
import struct

from tokenizers import Tokenizer
from transformers import AutoTokenizer

from conftest import run

DOCS = [
    "The history of the river town begins in 1208, when the first bridge was built.",
    "Ships carried wool, salt and timber; merchants' guilds kept the accounts.\n\nIn winter the river froze.",
    "Ünïcödé, русский текст, 日本語, and emoji 🚢 are bytes like any other.",
    "def harbour(n):\n    return [ship * 2 for ship in range(n)]  # code is text too",
] * 40


def shard_tokens(shard_dir):
    """Every token of a shard directory, in order (format: trainer/src/data/shards.rs)."""
    tokens = []
    for p in sorted(shard_dir.glob("*.bin")):
        b = p.read_bytes()
        assert b[:8] == b"SPTOKSH1"
        width, count = struct.unpack_from("<IQ", b, 12)
        fmt = {2: "H", 4: "I"}[width]
        tokens += struct.unpack_from(f"<{count}{fmt}", b, 64)
    return tokens


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def prepare(tmp_path, name, tokenizer, docs):
    src = tmp_path / f"{name}.jsonl"
    write_jsonl(src, docs)
    out = tmp_path / "shards" / name
    run("prepare", "--tokenizer", tokenizer, "--input", str(src), "--out", str(out))
    return out


def test_trained_tokenizer_encodes_as_python_tokenizers(tmp_path):
    src = tmp_path / "train.jsonl"
    write_jsonl(src, DOCS)
    tok_path = tmp_path / "tok" / "tokenizer.json"
    run("tokenizer", "train", "--input", str(src), "--vocab-size", "400", "--out", str(tok_path))
    py = Tokenizer.from_file(str(tok_path))
    assert py.get_vocab_size() == 400
    eot = py.token_to_id("<|endoftext|>")
    assert eot == 0
    out = prepare(tmp_path, "mine", str(tok_path), DOCS)
    want = []
    for d in DOCS:
        want += py.encode(d, add_special_tokens=False).ids + [eot]
    assert shard_tokens(out) == want
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 400
    assert (out / "tokenizer.json").read_bytes() == tok_path.read_bytes()


def checkpoint_of(tmp_path, shards):
    run_dir = tmp_path / "run"
    run("--config", "configs/tiny.yaml", "--max-steps", "2", "--quiet", "--out-dir", str(run_dir),
        "--set", f"data.train={shards}", "--set", f"data.val={shards}")
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def assert_hf_matches_shards(ckpt, shards):
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    assert hf.eos_token == "<|endoftext|>"
    ours = shard_tokens(shards)
    want = []
    for d in DOCS:
        want += hf.encode(d, add_special_tokens=False) + [hf.eos_token_id]
    assert ours == want
    first = ours[: ours.index(hf.eos_token_id)]
    assert hf.decode(first) == DOCS[0]


def test_checkpoint_tokenizer_loads_in_autotokenizer(tmp_path):
    src = tmp_path / "train.jsonl"
    write_jsonl(src, DOCS)
    tok_path = tmp_path / "tokenizer.json"
    run("tokenizer", "train", "--input", str(src), "--vocab-size", "400", "--out", str(tok_path))
    shards = prepare(tmp_path, "bpe", str(tok_path), DOCS)
    ckpt = checkpoint_of(tmp_path, shards)
    assert (ckpt / "tokenizer.json").read_bytes() == tok_path.read_bytes()
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    assert {"tokenizer.json", "tokenizer_config.json"} <= manifest["files"].keys()
    assert_hf_matches_shards(ckpt, shards)


def test_gpt2_checkpoint_tokenizer_is_gpt2(tmp_path):
    shards = prepare(tmp_path, "gpt2", "gpt2", DOCS)
    ckpt = checkpoint_of(tmp_path, shards)
    assert_hf_matches_shards(ckpt, shards)
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    assert hf.encode("The quick brown", add_special_tokens=False) == [464, 2068, 7586]
    assert hf.eos_token_id == 50256
