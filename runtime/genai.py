"""``genai_config.json``: what onnxruntime-genai needs to run an exported decoder as it is.

Written beside fused decoders (their family is one onnxruntime-genai knows, and their graph
has no ``position_ids``: the attention kernel derives positions from the cache). The cache
names follow presso's layout; past and present share one buffer per layer
(``past_present_share_buffer``), which ``GroupQueryAttention`` appends to in place, as
presso's own runtime does.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from presso.runtime.decoder import CacheLayout

GENAI_CONFIG = "genai_config.json"


def genai_config(model: nn.Module, layout: CacheLayout, file_name: str) -> dict[str, Any]:
    config = model.config
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) or config.eos_token_id
    context = config.max_position_embeddings
    return {
        "model": {
            "type": config.model_type,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos,
            "vocab_size": config.vocab_size,
            "context_length": context,
            "decoder": {
                "filename": file_name,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": layout.head_dim,
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": layout.kv_heads,
                "num_hidden_layers": layout.num_layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_%d", "past_value_names": "past_value_%d"},
                "outputs": {"logits": "logits", "present_key_names": "present_key_%d",
                            "present_value_names": "present_value_%d"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": context, "min_length": 0,
                   "past_present_share_buffer": True, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0, "num_return_sequences": 1, "early_stopping": True,
                   "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }
