"""Datasets: image folders and the procedural image generator (vision); text curation lives beside them."""
