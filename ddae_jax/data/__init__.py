"""Input: sources (TFDS, image folders, embedded data), augmentation, sharded batches."""
