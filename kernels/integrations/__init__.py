"""Adapters that put the fused loss inside other RL trainers (TRL, verl)."""
