"""Which model a MODEL_NAME names, and the folder name its stores get."""

from __future__ import annotations

from fastsae.lm.models import EMBEDDED_MODEL, resolve_model


def test_gguf_store_names_keep_the_version_and_quantisation(tmp_path):
    names = ["Llama-3.1-8B-Instruct-Q4_K_M.gguf", "Llama-3.2-1B-Instruct-Q8_0.gguf", "model.Q4_1.GGUF"]
    for name in names:
        (tmp_path / name).write_bytes(b"GGUF" + bytes(60))  # resolve_model reads only the magic number
    slugs = [resolve_model(str(tmp_path / name)).slug for name in names]
    assert slugs == ["Llama-3.1-8B-Instruct-Q4_K_M", "Llama-3.2-1B-Instruct-Q8_0", "model.Q4_1"]


def test_the_embedded_model_keeps_its_store_name():
    assert resolve_model(EMBEDDED_MODEL).slug == "SmolLM2-135M-Instruct"  # DEFAULT_STORE and existing stores use it
