"""Tiny random-init Hugging Face models that are not causal LMs, or that store their projections their own way, for
test_hf_foreign_layouts.py: an encoder with padding (BERT, RoBERTa, ModernBERT), encoder-decoders with cross
attention and embeddings tied across encoder, decoder and head (T5 with its relative position bias, BART), a
vision transformer (ViT: a patch convolution) and GPT-2 (Conv1D, fused qkv) / GPT-NeoX (fused qkv, its own
tp_plan). Sizes no mesh divides: vocabulary 97, 3 heads, batch 3, sequence 7.

    model = build("t5")                 # the same weights on every call (seeded), fp32, eager, train mode
    batch = make_batch("t5", seed=0)    # keyword arguments of forward, labels= included (HF's loss in forward)

``TP_PLANS`` gives each model without a tp_plan of its own one in HF's style strings (layouts/hf_plan.py
translates them): the attention projections colwise, the output projections rowwise, as Megatron splits a
transformer; GPT-NeoX brings its own.
"""

from __future__ import annotations

import torch

VOCAB, HIDDEN, HEADS, B, T, IMAGE, PATCH = 97, 24, 3, 3, 7, 12, 4

_TEXT = dict(vocab_size=VOCAB, pad_token_id=0)
_BERTISH = dict(_TEXT, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=40,
                max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_BARTISH = dict(_TEXT, d_model=HIDDEN, encoder_layers=2, decoder_layers=2, encoder_attention_heads=HEADS,
                decoder_attention_heads=HEADS, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=32,
                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, bos_token_id=1, eos_token_id=2,
                decoder_start_token_id=2, forced_eos_token_id=None)

# name -> (config class, model class, config fields, kind of input)
ARCHITECTURES: dict[str, tuple[str, str, dict, str]] = {
    "bert": ("BertConfig", "BertForMaskedLM", _BERTISH, "encoder"),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", dict(_BERTISH, pad_token_id=1, bos_token_id=0,
                                                            eos_token_id=2), "encoder"),
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM", dict(
        _TEXT, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=40,
        max_position_embeddings=32, global_attn_every_n_layers=2, local_attention=4, embedding_dropout=0.0,
        mlp_dropout=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
        "encoder"),
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(
        _TEXT, d_model=HIDDEN, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2, num_heads=HEADS,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        tie_word_embeddings=True, decoder_start_token_id=0, eos_token_id=1), "seq2seq"),
    "bart": ("BartConfig", "BartForConditionalGeneration", _BARTISH, "seq2seq"),
    "vit": ("ViTConfig", "ViTForImageClassification", dict(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=40, image_size=IMAGE,
        patch_size=PATCH, num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=5), "image"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        _TEXT, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=1, eos_token_id=2), "causal"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        _TEXT, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=40,
        max_position_embeddings=32, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2), "causal"),
}

_BERT_LAYER = {"attention.self.query": "colwise", "attention.self.key": "colwise", "attention.self.value": "colwise",
               "attention.output.dense": "rowwise", "intermediate.dense": "colwise", "output.dense": "rowwise"}
_BART_LAYER = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
               "self_attn.out_proj": "rowwise", "fc1": "colwise", "fc2": "rowwise"}
_BART_CROSS = {"encoder_attn.q_proj": "colwise", "encoder_attn.k_proj": "colwise", "encoder_attn.v_proj": "colwise",
               "encoder_attn.out_proj": "rowwise"}
_T5_ATTN = {"q": "colwise", "k": "colwise", "v": "colwise", "o": "rowwise"}


def _prefixed(prefix: str, entries: dict) -> dict:
    return {f"{prefix}.{name}": style for name, style in entries.items()}


TP_PLANS: dict[str, dict] = {
    "bert": _prefixed("bert.encoder.layer.*", _BERT_LAYER),
    "roberta": _prefixed("roberta.encoder.layer.*", _BERT_LAYER),
    "modernbert": {"model.layers.*.attn.Wqkv": "colwise", "model.layers.*.attn.Wo": "rowwise",
                   "model.layers.*.mlp.Wi": "packed_colwise", "model.layers.*.mlp.Wo": "rowwise"},  # Wi: [input | gate]
    "vit": _prefixed("vit.layers.*", {"attention.q_proj": "colwise", "attention.k_proj": "colwise",
                                      "attention.v_proj": "colwise", "attention.o_proj": "rowwise",
                                      "mlp.fc1": "colwise", "mlp.fc2": "rowwise"}),
    "t5": {**_prefixed("encoder.block.*.layer.0.SelfAttention", _T5_ATTN),
           **_prefixed("decoder.block.*.layer.0.SelfAttention", _T5_ATTN),
           **_prefixed("decoder.block.*.layer.1.EncDecAttention", _T5_ATTN),
           "*.layer.*.DenseReluDense.wi": "colwise", "*.layer.*.DenseReluDense.wo": "rowwise"},
    "gpt2": _prefixed("transformer.h.*", {"attn.c_attn": "colwise", "attn.c_proj": "rowwise", "mlp.c_fc": "colwise",
                                          "mlp.c_proj": "rowwise"}),
    "bart": {**_prefixed("model.encoder.layers.*", _BART_LAYER), **_prefixed("model.decoder.layers.*", _BART_LAYER),
             **_prefixed("model.decoder.layers.*", _BART_CROSS)},
}


def build(arch: str, attn_implementation: str = "eager") -> torch.nn.Module:
    """The tiny ``arch`` model, fp32, train mode, no dropout; the same weights on every call."""
    import transformers

    config_name, model_name, fields, _ = ARCHITECTURES[arch]
    config = getattr(transformers, config_name)(**fields)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).float()
    with torch.no_grad():  # norms start at 1 and biases at 0: move every parameter off its init
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.train()


def make_batch(arch: str, seed: int, batch: int = B, seq: int = T) -> dict[str, torch.Tensor]:
    """Forward's keyword arguments for a (``batch``, ``seq``) batch: padded rows (the attention mask zero at the
    end of every row but the first) and ``labels=`` so HF computes the loss inside forward."""
    generator = torch.Generator().manual_seed(seed)
    kind = ARCHITECTURES[arch][3]
    if kind == "image":
        return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=generator),
                "labels": torch.randint(0, 5, (batch,), generator=generator)}
    ids_BT = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    lengths_B = torch.tensor([seq] + [max(1, seq - 2 - i) for i in range(batch - 1)])
    mask_BT = (torch.arange(seq) < lengths_B[:, None]).long()
    labels_BT = torch.where(mask_BT.bool(), torch.randint(3, VOCAB, (batch, seq), generator=generator), -100)
    if kind == "causal":
        return {"input_ids": ids_BT, "attention_mask": mask_BT, "labels": labels_BT}
    out = {"input_ids": ids_BT, "attention_mask": mask_BT, "labels": labels_BT}
    if kind == "seq2seq":  # the decoder reads labels shifted right; the encoder's padding masks cross attention
        labels_BS = torch.randint(3, VOCAB, (batch, seq - 2), generator=generator)
        start = ARCHITECTURES[arch][2].get("decoder_start_token_id", 0)
        out["labels"] = labels_BS  # given explicitly, so forward works without labels= too (loss outside)
        out["decoder_input_ids"] = torch.cat([torch.full((batch, 1), start), labels_BS[:, :-1]], dim=1)
    return out


def loss_outside(arch: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss HF computes inside forward from ``labels=``, computed by the caller on the returned logits
    (for layouts whose forward must return the batch: ZeRO-3 on each rank's rows). Mean over labelled tokens."""
    kind = ARCHITECTURES[arch][3]
    if kind == "causal":  # token t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)
