"""Frozen, validated configuration models for her2scope and its default configuration."""

from her2scope.config.scoring import CaseRule, ScoringParams, StainVectors

__all__ = ["CaseRule", "ScoringParams", "StainVectors"]
