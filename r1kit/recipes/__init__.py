"""Recipes: whole jobs wired from configs (R1-Zero now; R1 multi-stage and distillation build on it)."""
