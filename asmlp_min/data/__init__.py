"""Data for the three tasks: synthetic shapes (no download) and loaders for the real on-disk formats."""
from .shapes import CATEGORIES, CLASSES, NUM_SEG_CLASSES, Scene, export_shapes, make_scene, scene_rng, scenes
