"""Recipes: one readable loop per algorithm."""
