"""Every Python block in README.md and docs/*.md runs, as written, against stand-ins.

The embedded SmolLM2 and "path/to/local/model" are replaced by a tiny random Llama (with
all-MiniLM-L6-v2's tokenizer, a real one that ships offline), calibration is capped at a few
batches, and each file's blocks run in order in one namespace inside a temporary folder. A
block that cannot run here says why in a comment right above it: ``<!-- docs-test: skip: why -->``.
"""
import re
from pathlib import Path

import pytest
import torch

import presso

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- docs-test: skip: (?P<why>[^>]*) -->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(path: Path) -> list[tuple[str, str | None]]:
    return [(m["code"], m["why"]) for m in BLOCK.finditer(path.read_text())]


def tiny_llama(vocab_size: int):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            tie_word_embeddings=True, bos_token_id=101, eos_token_id=102)
    return tf.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from presso import models

    return models.load("minilm-l6")[1]


@pytest.fixture
def stand_ins(tokenizer, monkeypatch, tmp_path):
    import transformers

    from presso import eval as ev
    from presso import models

    model = tiny_llama(tokenizer.vocab_size)
    monkeypatch.setattr(models, "load", lambda name: (model, tokenizer))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    real_batches = ev.calibration_batches
    monkeypatch.setattr(ev, "calibration_batches",
                        lambda tok, n=16, seq_len=128, batch_size=1: real_batches(tok, min(n, 4), min(seq_len, 64),
                                                                                  min(batch_size, 2)))
    real_ppl = ev.perplexity
    monkeypatch.setattr(ev, "perplexity", lambda m, tok, *a, **k: real_ppl(m, tok, windows=2, seq_len=64))
    monkeypatch.chdir(tmp_path)
    ids = torch.randint(200, 2000, (1, 16))
    return {"model": model, "tokenizer": tokenizer, "ids": ids, "x": ids, "batches": [ids, ids],
            "torch": torch, "presso": presso}


def test_every_doc_has_its_blocks_found():
    found = {p.name: len(blocks(p)) for p in DOCS}
    assert found["README.md"] >= 2 and found["quantization.md"] >= 1, found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(path, stand_ins):
    namespace = dict(stand_ins)
    ran = 0
    for code, why in blocks(path):
        if why:
            assert len(why.strip()) > 10, f"a skipped block in {path.name} must say why"
            continue
        exec(compile(code, f"{path.name} block", "exec"), namespace)  # noqa: S102 - our own docs
        ran += 1
    if not blocks(path):
        pytest.skip(f"{path.name} has no Python block")
    assert ran or all(why for _, why in blocks(path))


def test_every_name_the_docs_use_is_reachable_after_import_presso():
    used = set()
    for path in DOCS:
        used |= set(re.findall(r"(?<![\w.])presso\.([a-z_]+)\b", path.read_text()))
    used -= {"passes", "plugins"}  # packages the docs name as paths, imported as such
    for name in sorted(used):
        assert hasattr(presso, name), f"docs use presso.{name}, which `import presso` does not reach"
