"""napari integration: reader, sample data and dock widgets. Thin wrappers over the library."""
