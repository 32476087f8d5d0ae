"""Tiny random causal LMs built from configs, one per architecture family the tests cover."""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    Trainer,
    TrainingArguments,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128


def _llama() -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))


def _qwen2() -> PreTrainedModel:  # tied embeddings, q/k/v with bias
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True))


def _opt() -> PreTrainedModel:  # biases everywhere, fc1/fc2
    return OPTForCausalLM(OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=128))


def _gpt2() -> PreTrainedModel:  # Conv1D layers, weights stored (in, out)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128))


def sharp_llama(**overrides) -> PreTrainedModel:
    """Random float64 Llama with a large init range: token NLLs vary a lot, so misaligned scoring shows."""
    torch.manual_seed(0)
    sizes = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 64}
    config = LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5, **(sizes | overrides)
    )
    return LlamaForCausalLM(config).to(torch.float64).eval()


BUILDERS = {"llama": _llama, "qwen2": _qwen2, "opt": _opt, "gpt2": _gpt2}


def build(arch: str, seed: int = 0) -> PreTrainedModel:
    """A float32 model with deterministic random weights, in eval mode."""
    torch.manual_seed(seed)
    return BUILDERS[arch]().eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer whose ids fit the tiny models' vocabulary (printable ASCII + unk)."""
    chars = ["[UNK]", *dict.fromkeys(string.printable)]
    assert len(chars) <= VOCAB
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", model_max_length=128)


def train_with_trainer(model: PreTrainedModel, out: str, steps: int, learning_rate: float) -> list[float]:
    """A few Trainer steps on 8 random 16-token rows (the model's own ids as labels); the loss per step."""
    torch.manual_seed(0)
    rows = [{"input_ids": row, "labels": row} for row in torch.randint(0, VOCAB, (8, 16))]
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=learning_rate, report_to=[], save_strategy="no", logging_steps=1,
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]
