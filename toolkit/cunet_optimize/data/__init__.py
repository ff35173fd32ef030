"""Landmark data sets: readers, the synthetic face generator, and training transforms."""
