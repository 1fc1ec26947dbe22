"""Policies: a backbone (the built-in tiny one or a Hugging Face VLM) plus an action head."""

from vlacl.models.base import BACKBONE_INPUTS, ActionHead, Backbone, PolicyOutput
from vlacl.models.heads import build_head
from vlacl.models.load import BUILTIN_TINY, load_backbone
from vlacl.models.policy import Policy, binary_action_dims, build_policy, policy_from_head_config
from vlacl.models.tiny import TinyBackbone, TinyConfig, load_tiny_model, save_tiny_model

__all__ = [
    "BACKBONE_INPUTS",
    "BUILTIN_TINY",
    "ActionHead",
    "Backbone",
    "Policy",
    "PolicyOutput",
    "TinyBackbone",
    "TinyConfig",
    "binary_action_dims",
    "build_head",
    "build_policy",
    "load_backbone",
    "load_tiny_model",
    "policy_from_head_config",
    "save_tiny_model",
]
