"""Gated views of ``transformers`` causal LMs: unit inventory, costs, family adapters, slicing."""

from ppn_bayes.backbone.families import family_for, register, supported_model_types
from ppn_bayes.backbone.family import Family, SliceRule
from ppn_bayes.backbone.gated import GatedLM, gate
from ppn_bayes.backbone.slicing import LayerCut, cut_tensor, kv_plan, layer_cut
from ppn_bayes.backbone.units import ALL_KINDS, Dims, KeepSet, UnitInventory

__all__ = [
    "ALL_KINDS", "Dims", "Family", "GatedLM", "KeepSet", "LayerCut", "SliceRule", "UnitInventory",
    "cut_tensor", "family_for", "gate", "kv_plan", "layer_cut", "register", "supported_model_types",
]
