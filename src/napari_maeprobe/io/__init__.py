"""io: data in and out. Opening microscopy files and folders as :class:`~.image.MicroscopyImage`
(``reading``, ``image``, ``channels``), the bundled samples, safe file writes (``files``) and
the export of the observation table to h5ad / Parquet / CSV (``export``)."""
