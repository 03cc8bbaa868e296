"""tl: tools over the observation table, scanpy-style: PCA, UMAP, Leiden, k-means and filters
(``analysis``), the analyze step that writes them into the table (``analyze``), "what drives
these clusters" (``diagnostics``), and probes, effective rank and attention IoU (``evaluation``,
``evaluate``)."""
