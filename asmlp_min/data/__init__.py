"""Data for the three tasks: synthetic shapes (no download) and loaders for the real on-disk formats."""
from .datasets import ADE20KSegmentation, CocoDetection, ImageFolderClassification, detection_collate, load_coco
from .images import IMAGE_EXTENSIONS, is_image_file, load_image
from .shapes import (CATEGORIES, CLASSES, NUM_SEG_CLASSES, Scene, ShapesClassification, ShapesDetection,
                     ShapesSegmentation, export_shapes, make_scene, scene_rng, scenes)
