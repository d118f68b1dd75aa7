"""Recommendation: interactions dirs, recommenders (kind "recommender"), their evaluation and serving."""
