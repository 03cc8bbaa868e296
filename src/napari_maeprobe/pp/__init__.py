"""pp: preprocessing before any model runs. Normalisation, z handling, crops, tiles and the
patch grid (``preprocessing``), cell segmentation (``segmentation``, ``segment_batch``),
boundary maps (``boundaries``) and which patches a masked autoencoder hides (``masking``)."""
