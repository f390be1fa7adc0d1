"""Tensor parallelism for Hugging Face RoBERTa: RobertaLayer has BertLayer's
structure and parameter names, so it becomes a DistributedBertLayer, and
smp v1's RoBERTa translation functions are BERT's.

    hf = translate_state_dict_to_hf_roberta(smp_state_dict)        # smp -> HF names
    sd = translate_hf_state_dict_to_smdistributed_roberta(hf)       # HF -> smp names
"""

from smp.nn.huggingface.bert import (
    DistributedBertLayer,
    translate_hf_state_dict_to_smdistributed_bert,
    translate_state_dict_to_hf_bert,
)

DistributedRobertaLayer = DistributedBertLayer


def translate_state_dict_to_hf_roberta(state_dict, max_seq_len=None):
    """smp v1's function: a full smp state dict in Hugging Face RoBERTa's names."""
    return translate_state_dict_to_hf_bert(state_dict, max_seq_len)


def translate_hf_state_dict_to_smdistributed_roberta(state_dict):
    """smp v1's function: a Hugging Face RoBERTa state dict in smp's names."""
    return translate_hf_state_dict_to_smdistributed_bert(state_dict)


__all__ = ["DistributedRobertaLayer", "translate_state_dict_to_hf_roberta",
           "translate_hf_state_dict_to_smdistributed_roberta"]
