"""Checkpoint names vs model names: transformers renames some checkpoints' tensors on load (its conversion mapping,
e.g. Mixtral's `block_sparse_moe` -> `mlp`, VLM prefixes) and back on save. GPTQ settings (`dynamic` rules) are
written against the checkpoint's names, so both the quantizer and the writer translate through transformers' own
renamings. Its converters (which merge per-expert float weights into fused experts) match `.weight` names only and
never apply to quantized layers."""
from typing import Callable, Iterable


def _renamings(model, quantizer=None, reverse=False) -> list:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    if not reverse:
        transforms = get_model_conversion_mapping(model, None, quantizer)
    else:  # what revert_weight_conversion (save_pretrained) applies: the last transform first, each reversed
        transforms = getattr(model, "_weight_conversions", None)
        if transforms is None:  # a model not made by from_pretrained: no legacy renamings, no prefix changes
            transforms = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
        transforms = [t.reverse_transform() for t in transforms[::-1]]
    return [t for t in transforms if isinstance(t, WeightRenaming)]


def names_as_loaded(model, names: Iterable[str], quantizer=None) -> dict:
    """{name as transformers loads it into `model`: checkpoint tensor name} for the checkpoint's tensor `names`."""
    from transformers.core_model_loading import rename_source_key

    renamings = _renamings(model, quantizer)
    return {rename_source_key(name, renamings, [])[0]: name for name in names}


def saved_layer_name(model) -> Callable[[str], str]:
    """layer name in `model` -> the name save_pretrained gives its tensors' prefix."""
    from transformers.core_model_loading import rename_source_key

    renamings = _renamings(model, reverse=True)
    return lambda layer: rename_source_key(f"{layer}.weight", renamings, [], reverse=True)[0].removesuffix(".weight")
