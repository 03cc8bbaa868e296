"""napari integration: reader, sample data and (later) widgets. Thin wrappers over the library."""
