"""Training data: sources, records, images, captions, masks, buckets, the size index, the dataset and its batches, the
latent and text caches."""
