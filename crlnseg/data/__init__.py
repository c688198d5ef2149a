"""Datasets: case discovery, preprocessing, the prepared cache (manifest) and sampling."""
