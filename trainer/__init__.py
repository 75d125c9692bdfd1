"""l2c.trainer: vision training on cached text vectors, demo data, and caption-contrastive text fine-tuning."""
