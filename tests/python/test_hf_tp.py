"""Tensor parallelism for Hugging Face GPT-2 and BERT (smp.nn.huggingface):
the state-dict translations (single process), the layer replacements at tp 1
against the original layers, refused options, and under mpirun
(tests/python/mp/hf_tp.py) tp 2 and 4 forward and training equal to the plain
model in float32 and float64, tp x rdp, tp 2 x pp 2 (module-level pipeline),
state-dict and save_pretrained round trips, and checkpoints. Skipped when
transformers is not installed."""

import importlib.util

import pytest
import torch

from conftest import ok_ranks, run_mpi

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                       reason="transformers is not installed (optional test extra: "
                       "pip install transformers)"),
]


def _gpt2(**kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    return GPT2LMHeadModel(GPT2Config(**cfg))


def _bert(**kw):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
    cfg.update(kw)
    return BertForMaskedLM(BertConfig(**cfg))


def test_translations_round_trip_and_are_idempotent(smp_single):
    from smp.nn.huggingface import HFTranslator, bert, gpt2

    for build, to_smp, to_hf, layer in (
            (_gpt2, gpt2.translate_hf_state_dict_to_smdistributed_gpt2,
             gpt2.translate_state_dict_to_hf_gpt2, "transformer.h.1."),
            (_bert, bert.translate_hf_state_dict_to_smdistributed_bert,
             bert.translate_state_dict_to_hf_bert, "bert.encoder.layer.1.")):
        hf = build().state_dict()
        sd = to_smp(hf)
        assert layer + "attention.query.weight" in sd and layer + "output.dense2.bias" in sd
        assert not any(k.startswith(layer) and ("c_attn" in k or ".self." in k) for k in sd)
        assert to_smp(sd) is sd or list(to_smp(sd)) == list(sd)      # already smp: unchanged
        back = to_hf(sd)
        assert list(back) == list(hf)                               # same keys, same order
        for k, v in hf.items():
            assert torch.equal(back[k], v), k
        kind = "gpt2" if build is _gpt2 else "bert"
        t = HFTranslator(kind, [layer])       # one layer only: the other keeps smp names
        part = t.inverse(hf)
        assert layer + "attention.query.weight" in part
        assert (layer.replace(".1.", ".0.") + "attention.query.weight") not in part
        assert list(t(part)) == list(hf)
    # GPT-2's Conv1D (in, out) weights become Linear (out, in); c_attn splits in three
    hf = _gpt2().state_dict()
    sd = gpt2.translate_hf_state_dict_to_smdistributed_gpt2(hf)
    w = hf["transformer.h.0.attn.c_attn.weight"]
    assert torch.equal(sd["transformer.h.0.attention.key.weight"], w[:, 32:64].t())
    assert torch.equal(sd["transformer.h.0.output.dense1.weight"],
                       hf["transformer.h.0.mlp.c_fc.weight"].t())
    # smp v1's max_seq_len: the causal-mask buffers of older transformers
    old = gpt2.translate_state_dict_to_hf_gpt2(sd, max_seq_len=8)
    assert old["transformer.h.0.attn.bias"].shape == (1, 1, 8, 8)
    assert "transformer.h.0.attn.bias" not in gpt2.translate_hf_state_dict_to_smdistributed_gpt2(
        old)


def test_registry_and_v1_import_paths(smp_single):
    smp = smp_single
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    from smdistributed.modelparallel.torch.nn.huggingface.gpt2 import (
        translate_state_dict_to_hf_gpt2)
    from smp.nn.huggingface import bert, gpt2

    assert translate_state_dict_to_hf_gpt2 is gpt2.translate_state_dict_to_hf_gpt2
    reg = smp.tp.registry()
    assert reg[GPT2Block] is gpt2.DistributedGPT2Block
    assert reg[BertLayer] is bert.DistributedBertLayer
    from transformers.models.roberta.modeling_roberta import RobertaLayer

    assert smp.tp.registry()[RobertaLayer] is bert.DistributedBertLayer


def test_layers_at_tp1_equal_the_originals(smp_single):
    """DistributedGPT2Block / DistributedBertLayer.from_module compute what
    the Hugging Face layer computes, with boolean, float and no masks."""
    smp = smp_single
    smp.init({})
    from smp.nn.huggingface.bert import DistributedBertLayer
    from smp.nn.huggingface.gpt2 import DistributedGPT2Block

    torch.manual_seed(0)
    x = torch.randn(3, 6, 32, dtype=torch.float64)
    keep = torch.ones(3, 1, 6, 6, dtype=torch.bool)
    keep[0, ..., -2:] = False
    causal = torch.ones(6, 6, dtype=torch.bool).tril().expand(3, 1, 6, 6) & keep
    for net, block, cls, masks in (
            (_gpt2(), lambda n: n.transformer.h[0], DistributedGPT2Block,
             (None, causal, torch.zeros(3, 1, 6, 6, dtype=torch.float64).masked_fill(
                 ~causal, torch.finfo(torch.float64).min))),
            (_bert(), lambda n: n.bert.encoder.layer[1], DistributedBertLayer,
             (None, keep))):
        net = net.double()
        ref = block(net)
        dist = cls.from_module(ref)
        for mask in masks:
            if cls is DistributedGPT2Block:
                want, got = ref(x, None, mask), dist(x, None, mask)
            else:
                want, got = ref(x, mask), dist(x, mask)
            assert torch.allclose(got, want, atol=1e-12), (cls.__name__, (got - want).abs().max())


def test_unsupported_options_are_refused(smp_single):
    smp = smp_single
    smp.init({})
    from smp.nn.huggingface.bert import DistributedBertLayer
    from smp.nn.huggingface.gpt2 import DistributedGPT2Block

    with pytest.raises(smp.NotSupportedError, match=r"activation_function='gelu_fast'.*"
                       r"set_tensor_parallelism\(layer, False\)"):
        DistributedGPT2Block.from_module(_gpt2(activation_function="gelu_fast").transformer.h[0])
    with pytest.raises(smp.NotSupportedError, match="scale_attn_by_inverse_layer_idx=True"):
        DistributedGPT2Block(_gpt2(scale_attn_by_inverse_layer_idx=True).config)
    with pytest.raises(smp.NotSupportedError, match="add_cross_attention=True"):
        DistributedBertLayer(_bert(is_decoder=True, add_cross_attention=True).config)
    block = DistributedGPT2Block.from_module(_gpt2().transformer.h[0])
    with pytest.raises(smp.NotSupportedError, match="encoder_hidden_states"):
        block(torch.randn(1, 2, 32), None, None, encoder_hidden_states=torch.randn(1, 2, 32))


def _run(np, *args):
    out = run_mpi(np, "hf_tp.py", *[str(a) for a in args]).stdout
    assert ok_ranks(out, "hf_tp") == list(range(np)), out
    return out


@pytest.mark.mpi
def test_tp2_gpt2_float64_bert_float32_and_round_trips(tmp_path):
    """tp 2: GPT-2 in float64, BERT and RoBERTa in float32 equal the plain
    model; the state dict and save_pretrained round trips for GPT-2 and BERT."""
    _run(2, "train", "gpt2", 2, 1, "float64", "+", "train", "bert", 2, 1, "float32",
         "+", "train", "roberta", 2, 1, "float32", "+", "roundtrip", tmp_path)


@pytest.mark.mpi
def test_tp4_and_tp2_rdp2():
    """tp 4: GPT-2 in float32, BERT in float64; tp 2 x rdp 2: BERT."""
    _run(4, "train", "gpt2", 4, 1, "float32", "+", "train", "bert", 4, 1, "float64",
         "+", "train", "bert", 2, 1, "float32")


@pytest.mark.mpi
def test_tp2_pp2_training_and_checkpoints(tmp_path):
    """tp 2 x pp 2 (module-level pipeline): GPT-2 (simple schedule) and BERT
    (interleaved) training equal to the plain model; partial checkpoint resume equal to uninterrupted training;
    the full checkpoint is the Hugging Face model's state dict and resumes."""
    _run(4, "train", "gpt2", 2, 2, "float32", "simple", "+", "train", "bert", 2, 2, "float32",
         "+", "checkpoint", tmp_path)
